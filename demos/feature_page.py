"""Write an HTML page of a feature's top-activating contexts, tokens shaded by activation.

    python demos/feature_page.py runs/demo/dictionaries/trainer_3 --layer 3 --site mlp
    python demos/feature_page.py runs/demo/dictionaries/trainer_3 --feature 120 --out feature.html

Reads held-out BBC News articles (or --texts) through the model (SmolLM2 by default, or --model),
and also lists the next tokens whose probability the feature raises most.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dictionary_learning import load_dictionary
from dictionary_learning.buffer import ActivationReader
from dictionary_learning.data import text_files_to_generator
from dictionary_learning.interp import feature_activations, feature_effect, feature_html, top_activating_contexts
from dictionary_learning.models import default_texts, get_submodule, load_default_model, load_model


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dictionary", help="a checkpoint folder")
    parser.add_argument("--model", help="Hub id or local folder (default: the offline SmolLM2-135M)")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--site", default="mlp", choices=["mlp", "resid", "attn"])
    parser.add_argument("--feature", type=int, help="feature index (default: the most strongly active one)")
    parser.add_argument("--texts", help="a .txt file or folder (default: BBC News articles)")
    parser.add_argument("--n-texts", type=int, default=256, help="documents to search")
    parser.add_argument("--out", default=None, help="HTML file (default: feature_<i>.html beside the dictionary)")
    args = parser.parse_args(argv)

    model = load_model(args.model) if args.model else load_default_model()
    site = get_submodule(model, args.layer, args.site)
    ae, config = load_dictionary(args.dictionary)
    texts = list(text_files_to_generator(args.texts) if args.texts else default_texts())[: args.n_texts]
    reader = ActivationReader(iter(()), model, site, ctx_len=128)
    feature = args.feature
    if feature is None:
        with torch.no_grad():
            feature = int(feature_activations(ae, reader, reader.tokenize(texts[:32])).amax(dim=(0, 1)).argmax())
    contexts = top_activating_contexts(ae, reader, feature, texts, k=20)
    # each context ends at the feature's peak, so zeroing it at the last token measures its own effect
    tokens, values = feature_effect(model, site, ae, feature, ["".join(c.tokens) for c in contexts], k=8)
    recipe = config.get("trainer", {}).get("trainer_class", type(ae).__name__)
    title = f"Feature {feature} of {Path(args.dictionary).name} ({recipe}, {args.site} layer {args.layer})"
    out = Path(args.out or Path(args.dictionary) / f"feature_{feature}.html")
    page = feature_html(feature, contexts, title=title)
    effects = ", ".join(f"{t!r} {v:+.3f}" for t, v in zip(tokens, values.tolist()))
    page = page.replace(
        "</table>",
        f"</table><p>Next tokens it promotes most (mean log-prob change when the feature is"
        f" zeroed at the last token, reversed sign): {effects}</p>",
    )
    out.write_text(page, encoding="utf-8")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
