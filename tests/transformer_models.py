"""Small transformer models built locally for the tests (issue 15, item 7): no download, no weights.

Two families beside the reference CNN:

* Hugging Face models built from configs (``transformers`` is a dev dependency): GPT-2 (``Conv1D``
  weights stored in x out, ``gelu_new``, tied ``wte``/``lm_head``), BERT (erf GELU) and ViT, with eager or
  sdpa attention. They are what users train; they carry the quirks the recorder must get right.
* The pure-torch :func:`bbdecoder.recorder.demo.make_tiny_gpt2` / ``make_tiny_bert`` (no transformers).

Every builder seeds torch, so two calls give the same weights.
"""
from __future__ import annotations

import logging

import torch

VOCAB = 128     # tokens
CONTEXT = 16    # tokens per sequence
D = 32          # hidden size
HEADS = 2
LAYERS = 2

logging.getLogger("transformers").setLevel(logging.ERROR)


def hf_gpt2(attn: str = "eager", layers: int = LAYERS, d: int = D, seed: int = 0, activation: str = "gelu_new"):
    """A GPT-2 LM (``GPT2LMHeadModel``) of ``layers`` blocks, hidden size ``d``, vocab :data:`VOCAB`.

    Args:
        attn: ``"eager"`` (softmax observable) or ``"sdpa"``.
        activation: the MLP's ``activation_function`` (``gelu_new``, ``gelu_pytorch_tanh``, ``gelu``...).
    """
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=d, n_layer=layers, n_head=HEADS,
                     bos_token_id=0, eos_token_id=0, activation_function=activation,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=attn)
    return GPT2LMHeadModel(cfg)


def hf_bert(attn: str = "eager", layers: int = LAYERS, d: int = D, seed: int = 0, num_labels: int = 2):
    """A BERT sequence classifier (``BertForSequenceClassification``), erf GELU, no dropout."""
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=d, num_hidden_layers=layers, num_attention_heads=HEADS,
                     intermediate_size=2 * d, max_position_embeddings=CONTEXT, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation=attn)
    return BertForSequenceClassification(cfg)


def hf_vit(attn: str = "eager", layers: int = LAYERS, d: int = D, seed: int = 0, num_labels: int = 3,
           image: int = 32, patch: int = 8):
    """A ViT image classifier (``ViTForImageClassification``) on ``image`` x ``image`` RGB inputs."""
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=image, patch_size=patch, num_channels=3, hidden_size=d, num_hidden_layers=layers,
                    num_attention_heads=HEADS, intermediate_size=2 * d, num_labels=num_labels,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation=attn)
    return ViTForImageClassification(cfg)


def tiny_gpt2(seed: int = 0):
    """The pure-torch GPT-2-style decoder of ``bbdecoder.recorder.demo`` at test size."""
    from bbdecoder.recorder.demo import make_tiny_gpt2
    torch.manual_seed(seed)
    return make_tiny_gpt2(vocab=VOCAB, context=CONTEXT, d=D, heads=HEADS, layers=LAYERS)


def tiny_bert(seed: int = 0):
    """The pure-torch BERT-style encoder of ``bbdecoder.recorder.demo`` at test size."""
    from bbdecoder.recorder.demo import make_tiny_bert
    torch.manual_seed(seed)
    return make_tiny_bert(vocab=VOCAB, context=CONTEXT, d=D, heads=HEADS, layers=LAYERS)


def tokens(n: int, seed: int = 0, num_labels: int = 2):
    """``n`` random sequences: (input_ids (n, CONTEXT) int64, labels (n,) int64 in [0, num_labels))."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (n, CONTEXT), generator=g),
            torch.randint(0, num_labels, (n,), generator=g))


def images(n: int, seed: int = 0, num_labels: int = 3, size: int = 32):
    """``n`` random images (n, 3, size, size) float32 and labels (n,) int64."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, num_labels, (n,), generator=g)
