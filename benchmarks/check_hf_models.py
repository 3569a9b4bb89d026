"""find_laws on Hugging Face architectures: which laws each gets, and that every one is a law.

For each architecture a tiny random model (2 layers, width 16, float64, train mode, dropout 0,
Hugging Face's default SDPA attention) is traced by `consopt.find_laws`, with the loss its head
calls for (softmax cross-entropy on logits, else MSE); `LawSet.verify` then checks every exact
family by autograd on the traced batch and on a fresh one (worst |cos(∇h, ∇L)|; a law gives
~1e-16, the bar is 1e-10). Reports per model: families by kind, functions, worst cosine, the
time find_laws took, and the notes (what was dropped, and why).

Needs `transformers` (not a consopt dependency):

    pip install transformers
    python benchmarks/check_hf_models.py [--models gpt2,llama,...] [--markdown]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import consopt

V = 13  # vocabulary
CE = lambda o, y: F.cross_entropy(o.reshape(-1, o.shape[-1]), y.reshape(-1))  # noqa: E731
MSE = lambda o, y: F.mse_loss(o, y)  # noqa: E731


class Wrap(torch.nn.Module):
    """Positional tensors in, one tensor out (what find_laws traces)."""

    def __init__(self, model, call):
        super().__init__()
        self.m, self.call = model, call

    def forward(self, *args):
        return self.call(self.m, *args)


def _ids(b=2, n=6):
    return torch.randint(3, V, (b, n))


def _img(b=2, c=3, s=8):
    return torch.randn(b, c, s, s)


def builders(T):
    """name -> () -> (model, call, inputs, loss) for the transformers module T."""
    lm = lambda m, t: m(input_ids=t, use_cache=False).logits  # noqa: E731
    enc = lambda m, t: m(input_ids=t).logits  # noqa: E731
    s2s = lambda m, a, b: m(input_ids=a, decoder_input_ids=b, use_cache=False).logits  # noqa: E731
    pix = lambda m, x: m(pixel_values=x).logits  # noqa: E731
    dec = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=V, max_position_embeddings=32, tie_word_embeddings=False)
    bert = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, vocab_size=V,
                max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    vit = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, image_size=8,
               patch_size=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return {
        "gpt2": lambda: (T.GPT2LMHeadModel(T.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=8, vocab_size=V,
                                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
                         lm, (_ids(),), "cross_entropy"),
        "llama": lambda: (T.LlamaForCausalLM(T.LlamaConfig(**dec)), lm, (_ids(),), "cross_entropy"),
        "mistral": lambda: (T.MistralForCausalLM(T.MistralConfig(**dec)), lm, (_ids(),), "cross_entropy"),
        "qwen2": lambda: (T.Qwen2ForCausalLM(T.Qwen2Config(**dec)), lm, (_ids(),), "cross_entropy"),
        "qwen3": lambda: (T.Qwen3ForCausalLM(T.Qwen3Config(**dec, head_dim=4)), lm, (_ids(),), "cross_entropy"),
        "phi3": lambda: (T.Phi3ForCausalLM(T.Phi3Config(**dec, pad_token_id=0)), lm, (_ids(),), "cross_entropy"),
        "gemma": lambda: (T.GemmaForCausalLM(T.GemmaConfig(**dec, head_dim=4)), lm, (_ids(),), "cross_entropy"),
        "gpt_neox": lambda: (T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
            hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, vocab_size=V,
            max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0, rotary_pct=0.5)),
            lm, (_ids(),), "cross_entropy"),
        "opt": lambda: (T.OPTForCausalLM(T.OPTConfig(
            hidden_size=16, ffn_dim=24, num_hidden_layers=2, num_attention_heads=2, vocab_size=V,
            max_position_embeddings=32, word_embed_proj_dim=16, dropout=0.0, attention_dropout=0.0,
            pad_token_id=1)), lm, (_ids(),), "cross_entropy"),
        "bloom": lambda: (T.BloomForCausalLM(T.BloomConfig(hidden_size=16, n_layer=2, n_head=2, vocab_size=V,
                                                           hidden_dropout=0.0, attention_dropout=0.0)),
                          lm, (_ids(),), "cross_entropy"),
        "falcon": lambda: (T.FalconForCausalLM(T.FalconConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, vocab_size=V, hidden_dropout=0.0,
            attention_dropout=0.0, new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False)),
            lm, (_ids(),), "cross_entropy"),
        "bert": lambda: (T.BertForMaskedLM(T.BertConfig(**bert)), enc, (_ids(),), "cross_entropy"),
        "roberta": lambda: (T.RobertaForMaskedLM(T.RobertaConfig(**bert, pad_token_id=1)), enc, (_ids(),),
                            "cross_entropy"),
        "distilbert": lambda: (T.DistilBertForMaskedLM(T.DistilBertConfig(
            dim=16, hidden_dim=24, n_layers=2, n_heads=2, vocab_size=V, max_position_embeddings=32, dropout=0.0,
            attention_dropout=0.0)), enc, (_ids(),), "cross_entropy"),
        "t5": lambda: (T.T5ForConditionalGeneration(T.T5Config(
            d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=V,
            dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, tie_word_embeddings=False)),
            s2s, (_ids(), _ids(2, 5)), "cross_entropy"),
        "bart": lambda: (T.BartForConditionalGeneration(T.BartConfig(
            d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=24, decoder_ffn_dim=24, vocab_size=V, max_position_embeddings=32, dropout=0.0,
            attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
            decoder_start_token_id=2)), s2s, (_ids(), _ids(2, 5)), "cross_entropy"),
        "vit": lambda: (T.ViTForImageClassification(T.ViTConfig(**vit, num_labels=3)), pix, (_img(),),
                        "cross_entropy"),
        "clip_text": lambda: (T.CLIPTextModel(T.CLIPTextConfig(
            hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, vocab_size=V,
            max_position_embeddings=32)), lambda m, t: m(input_ids=t).last_hidden_state, (_ids(),), "mse"),
        "resnet": lambda: (T.ResNetForImageClassification(T.ResNetConfig(
            num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)),
            pix, (_img(s=16),), "cross_entropy"),
        "convnext": lambda: (T.ConvNextForImageClassification(T.ConvNextConfig(
            num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], patch_size=2, num_labels=3,
            drop_path_rate=0.0)), pix, (_img(s=16),), "cross_entropy"),
    }


def check(name, build):
    torch.manual_seed(0)
    model, call, inputs, loss = build()
    w = Wrap(model.double().train(), call)
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    t0 = time.perf_counter()
    laws = consopt.find_laws(w, inputs, loss=loss)
    secs = time.perf_counter() - t0
    loss_fn = CE if loss == "cross_entropy" else MSE
    worst = 0.0
    for batch in range(2):  # the traced inputs, then fresh ones
        if batch:
            torch.manual_seed(1)
            inputs = tuple(torch.randn_like(x) if x.is_floating_point() else torch.randint(3, V, x.shape)
                           for x in inputs)
        with torch.no_grad():
            out = w(*inputs)
        target = torch.randint(0, out.shape[-1], out.shape[:-1]) if loss == "cross_entropy" else torch.randn_like(out)
        cos = laws.verify(w, inputs, target, loss_fn)
        worst = max([worst] + [cos[f.name] for f in laws.families if not f.approximate])
    kinds = collections.Counter(f.kind for f in laws.families)
    return dict(model=name, kinds=dict(kinds), functions=laws.num_functions, worst=worst, secs=secs,
                notes=laws.notes)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help="comma-separated subset")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args(argv)
    try:
        import transformers as T
    except ImportError:
        sys.exit("this check needs transformers: pip install transformers")
    warnings.filterwarnings("ignore")
    T.logging.set_verbosity_error()
    table = builders(T)
    names = args.models.split(",") if args.models else list(table)
    print(f"torch {torch.__version__}, transformers {T.__version__}")
    order = ("rescale", "gate", "linear", "stream", "attention_qk", "attention_vo", "translation")
    abbrev = dict(rescale="R", gate="G", linear="L", stream="S", attention_qk="QK", attention_vo="VO", translation="T")
    if args.markdown:
        print("| model | families | functions | worst \\|cos\\| | find_laws | dropped (notes) |")
        print("|---|---|---|---|---|---|")
    bad = 0
    for name in names:
        try:
            r = check(name, table[name])
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{name}: failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            bad += 1
            continue
        fams = " ".join(f"{abbrev[k]}{r['kinds'][k]}" for k in order if k in r["kinds"]) or "none"
        notes = "; ".join(n[:90] for n in r["notes"]) or "-"
        bad += r["worst"] > 1e-10
        if args.markdown:
            print(f"| {name} | {fams} | {r['functions']} | {r['worst']:.0e} | {r['secs']:.1f} s | {notes} |")
        else:
            print(f"{name:12s} {fams:28s} {r['functions']:7d} functions  worst |cos| {r['worst']:.1e}  "
                  f"{r['secs']:.1f} s  {notes}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
