"""Tiny language models built from a config (random weights, a BPE tokenizer trained in-process):
no downloads, a few seconds to build."""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dictionary_learning.nnsight_io import wrap_model

TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "To be, or not to be, that is the question. All that glitters is not gold. Knowledge is power. "
) * 30
SENTENCES = [s.strip() + "." for s in TEXT.split(".") if s.strip()][:40]


@functools.cache
def tokenizer(with_distinct_bos: bool = False) -> PreTrainedTokenizerFast:
    specials = ["<|endoftext|>", "<s>"] if with_distinct_bos else ["<|endoftext|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator([TEXT], trainer=trainer)
    bos = "<s>" if with_distinct_bos else "<|endoftext|>"
    if with_distinct_bos:  # prepend BOS like Llama tokenizers do
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=bos,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def gpt_neox(d_model: int = 32, n_layers: int = 2, seed: int = 0):
    tok = tokenizer()
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=len(tok),
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        intermediate_size=4 * d_model,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return wrap_model(GPTNeoXForCausalLM(cfg).eval(), tok)


def llama(d_model: int = 32, n_layers: int = 2, seed: int = 0):
    """Same module paths as SmolLM2; its tokenizer prepends a BOS distinct from EOS."""
    tok = tokenizer(with_distinct_bos=True)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=4 * d_model,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return wrap_model(LlamaForCausalLM(cfg).eval(), tok)
