"""dictionary_learning: train, evaluate and load sparse dictionaries (SAEs) on language-model activations.

Dimension key used in tensor names throughout the package (e.g. `x_BD`, `W_dec_FD`):

    B  batch (tokens)          L  sequence length
    D  activation dimension    F  dictionary size (number of features)
    K  k of TopK               G  number of Matryoshka groups

Importing the package touches neither the network nor nnsight.
"""

from ._version import __version__ as __version__
from .buffer import ActivationBuffer, PairedActivationBuffer
from .checkpoint import CheckpointError, get_nested_folders, load_dictionary, save_dictionary
from .circuit_export import export_circuit_tracer, load_circuit_tracer
from .dictionaries import (
    DICTIONARY_REGISTRY,
    AbsTopKSAE,
    AutoEncoder,
    AutoEncoderNew,
    AutoEncoderTopK,
    BatchTopKCrossCoder,
    BatchTopKCrossLayerTranscoder,
    BatchTopKSAE,
    CrossCoder,
    Dictionary,
    GatedAutoEncoder,
    IdentityDict,
    JumpReluAutoEncoder,
    JumpReluCrossLayerTranscoder,
    MatchingPursuitSAE,
    MatryoshkaBatchTopKSAE,
    TopKCrossLayerTranscoder,
    register_dictionary,
)
from .evaluation import evaluate
from .reader import ActivationReader
from .run import NonFiniteTrainingError, TrainingInterrupted
from .run_config import RunConfig
from .safe_io import FolderLockedError
from .trainers import TRAINER_REGISTRY
from .training import trainSAE

__all__ = [
    "ActivationBuffer",
    "ActivationReader",
    "DICTIONARY_REGISTRY",
    "AbsTopKSAE",
    "AutoEncoder",
    "AutoEncoderNew",
    "AutoEncoderTopK",
    "BatchTopKCrossCoder",
    "BatchTopKCrossLayerTranscoder",
    "BatchTopKSAE",
    "CheckpointError",
    "CrossCoder",
    "Dictionary",
    "FolderLockedError",
    "GatedAutoEncoder",
    "IdentityDict",
    "JumpReluAutoEncoder",
    "JumpReluCrossLayerTranscoder",
    "MatchingPursuitSAE",
    "MatryoshkaBatchTopKSAE",
    "NonFiniteTrainingError",
    "PairedActivationBuffer",
    "RunConfig",
    "TRAINER_REGISTRY",
    "TopKCrossLayerTranscoder",
    "TrainingInterrupted",
    "evaluate",
    "export_circuit_tracer",
    "get_nested_folders",
    "load_circuit_tracer",
    "load_dictionary",
    "register_dictionary",
    "save_dictionary",
    "trainSAE",
]
