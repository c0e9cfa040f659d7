"""`lmjax eval`: loss, perplexity, bits per byte and token accuracy of a run, with standard errors.

    lmjax eval --workdir=DIR                       # the run's held-out split
    lmjax eval --workdir=DIR --split=train         # or its training text
    lmjax eval --workdir=DIR --text='notes/*.txt'  # or any local UTF-8 files, all of them

Bits per byte divide the summed loss (converted to bits) by the UTF-8 bytes the target tokens
decode to, so runs with different tokenizers compare (Gao et al. 2020, The Pile). Text is scored
as training sees it: rows of seq_len targets cut from one token stream with an EOS after each
document, every transition scored once, the last row padded with zero-weight targets.
Standard errors treat sequences (rows) as the independent units, since tokens within a row are
correlated: a ratio estimator over per-row sums, and the delta method for perplexity.

The model is restored onto the run's mesh and rules and batches are split over the batch axes,
exactly as in training (`--config.mesh.*` lays it out differently); every process computes the
same rows and takes its own part of each global batch.
"""

import math
import os

import jax
import ml_collections
import numpy as np
import sentencepiece as spm
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lmjax import checkpoint, loss, sharding
from lmjax import config as config_lib
from lmjax.data import pipeline, sources
from lmjax.data.tokenizer import Tokenizer

SPLITS = ("eval", "train", "all")


def bytes_per_token(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each id decodes to: byte pieces 1, control ids (pad, bos, eos) 0, others
    their text with '▁' as a space. Exact because lmjax tokenizers are lossless (identity
    normalisation, no dummy prefix): decode(ids) is the concatenation of these pieces."""
    sp = spm.SentencePieceProcessor(model_proto=tokenizer.serialized())
    out = np.zeros(sp.vocab_size(), np.int64)
    for i in range(sp.vocab_size()):
        if sp.is_byte(i):
            out[i] = 1
        elif not (sp.is_control(i) or sp.is_unknown(i)):
            out[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return out


def stream_rows(stream: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """Rows covering every transition of `stream` once: inputs, targets, weights [R, seq_len]."""
    n = len(stream) - 1
    R = max(1, math.ceil(n / seq_len))
    padded = np.zeros(R * seq_len + 1, np.int32)
    padded[: len(stream)] = stream
    index_RL = np.arange(R)[:, None] * seq_len + np.arange(seq_len)[None, :]
    return {"inputs": padded[index_RL], "targets": padded[index_RL + 1],
            "weights": (index_RL < n).astype(np.float32)}


def _rows(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer | None, split: str,
          max_rows: int) -> dict[str, np.ndarray]:
    d = cfg.data
    if d.source == "text":
        paths = sources.resolve_text(d.text)
        if split == "all":
            stream, _ = sources.text_streams(paths, tokenizer, 0.0)
        else:
            train, held_out = sources.text_streams(paths, tokenizer, d.eval_fraction)
            stream = train if split == "train" else held_out
        if len(stream) < 2:
            raise ValueError(f"The {split!r} split of data.text={d.text!r} has no tokens to "
                             "score (is data.eval_fraction 0?).")
        rows = stream_rows(stream, d.seq_len)
        if d.segment_mask:  # as the pipeline does: an EOS input opens a new segment
            rows["segment_ids"] = (1 + np.cumsum(rows["inputs"] == tokenizer.eos_id, axis=1)
                                   ).astype(np.int32)
            rows["positions"] = np.stack([pipeline.positions(s) for s in rows["segment_ids"]])
    elif d.source == "synthetic":
        count = max_rows or cfg.train.eval_batches * d.global_batch_size
        table = sources.synthetic_rows(cfg, split=0 if split == "train" else 1)
        stream_rows_ = np.stack([table[i] for i in range(count)])
        rows = {"inputs": stream_rows_[:, :-1], "targets": stream_rows_[:, 1:],
                "weights": np.ones((count, d.seq_len), np.float32)}
    else:
        raise ValueError(f"lmjax eval reads data.source 'text' or 'synthetic', not "
                         f"{d.source!r}; its training run reports eval/loss in metrics.jsonl.")
    if max_rows:
        rows = {k: v[:max_rows] for k, v in rows.items()}
    return rows


def _row_sums(graphdef: nnx.GraphDef, state: nnx.State, batch: dict) -> dict:
    """Per-row sums of the loss and correct predictions, and target counts, from loss.py."""
    model = nnx.merge(graphdef, state)
    extra = {"segment_ids_BL": batch["segment_ids"]} if "segment_ids" in batch else {}
    logits_BLV = model(batch["inputs"], batch.get("positions"), **extra)

    def one_row(logits_LV, targets_L, weights_L):
        _, aux = loss.cross_entropy(logits_LV[None], targets_L[None], weights_L[None])
        n = aux["num_tokens"]
        return {"nll": aux["loss"] * n, "correct": aux["accuracy"] * n, "tokens": n}

    return jax.vmap(one_row)(logits_BLV, batch["targets"], batch["weights"])


def ratio(x_R: np.ndarray, n_R: np.ndarray) -> tuple[float, float]:
    """sum(x) / sum(n) and its standard error, rows as independent units (ratio estimator):
    se^2 = sum((x - r n)^2) / (R (R - 1) mean(n)^2)."""
    x_R, n_R = np.asarray(x_R, np.float64), np.asarray(n_R, np.float64)
    r, R = x_R.sum() / n_R.sum(), len(x_R)
    if R < 2:
        return float(r), float("nan")
    se = math.sqrt(((x_R - r * n_R) ** 2).sum() / (R * (R - 1))) / n_R.mean()
    return float(r), float(se)


def summarize(nll_R, correct_R, tokens_R, bytes_R=None) -> dict[str, float]:
    """The reported figures from per-row sums (rows without targets are left out)."""
    keep = np.asarray(tokens_R) > 0
    nll_R, correct_R, tokens_R = (np.asarray(a)[keep] for a in (nll_R, correct_R, tokens_R))
    loss_, loss_se = ratio(nll_R, tokens_R)
    accuracy, accuracy_se = ratio(correct_R, tokens_R)
    out = {"eval/loss": loss_, "eval/loss_se": loss_se,
           "eval/perplexity": math.exp(loss_), "eval/perplexity_se": math.exp(loss_) * loss_se,
           "eval/accuracy": accuracy, "eval/accuracy_se": accuracy_se,
           "eval/tokens": int(tokens_R.sum()), "eval/sequences": int(keep.sum())}
    if bytes_R is not None:
        bytes_R = np.asarray(bytes_R)[keep]
        nats_per_byte, se = ratio(nll_R, bytes_R)
        out.update({"eval/bits_per_byte": nats_per_byte / math.log(2),
                    "eval/bits_per_byte_se": se / math.log(2), "eval/bytes": int(bytes_R.sum())})
    return out


def evaluate(workdir: str, *, split: str = "eval", text: str | None = None,
             step: int | None = None, batches: int = 0, overrides: tuple[str, ...] = (),
             devices=None) -> dict:
    """Figures of the run in `workdir` (latest or given step) on `split` of its data, or on all
    of `text` (a shipped name or a glob); at most `batches` global batches (0: every row).
    `overrides` ('data.x=y', 'mesh.x=y') change what is read and how it is laid out."""
    if split not in SPLITS:
        raise ValueError(f"--split={split!r} is not one of {SPLITS}.")
    cfg = config_lib.from_workdir(workdir)
    for item in ([f"data.text={text}"] if text else []) + list(overrides):
        key, sep, value = item.partition("=")
        if not sep or not key.startswith(("data.", "mesh.")):
            raise ValueError(f"lmjax eval takes --config.data.* and --config.mesh.* overrides "
                             f"only, not {item!r}: the model is the checkpoint's.")
        config_lib.set_value(cfg, key, value)
    devices = jax.devices() if devices is None else devices
    config_lib.validate(cfg, len(devices))
    mesh = sharding.make_mesh(cfg, devices)
    model, _, tokenizer = checkpoint.load_for_inference(workdir, step, mesh)
    if cfg.data.source == "text" and tokenizer is None:
        raise FileNotFoundError(f"{workdir} has no tokenizer.model to encode text with.")
    B = cfg.data.global_batch_size
    rows = _rows(cfg, tokenizer, "all" if text else split, batches * B)
    R = len(rows["inputs"])
    pad = -R % B  # whole global batches; padding rows have no targets
    rows = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in rows.items()}

    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules(cfg.mesh.rules)):
        row_sums = jax.jit(lambda s, b: _row_sums(graphdef, s, b),
                           out_shardings=NamedSharding(mesh, P()))
        per = B // jax.process_count()
        mine = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
        sums = []
        for start in range(0, len(rows["inputs"]), B):
            batch = {k: v[start:start + B][mine] for k, v in rows.items()}
            # fetched at once: CPU collectives of several programs in flight can deadlock
            sums.append(jax.device_get(row_sums(state, sharding.to_global(batch, mesh))))
    sums = {k: np.concatenate([s[k] for s in sums]) for k in sums[0]}
    row_bytes = None
    if tokenizer is not None:
        table = bytes_per_token(tokenizer)
        row_bytes = (table[rows["targets"]] * (rows["weights"] > 0)).sum(axis=1)
    result = summarize(sums["nll"], sums["correct"], sums["tokens"], row_bytes)
    return {"step": checkpoint_step(workdir, step), **result}


def checkpoint_step(workdir: str, step: int | None) -> int:
    """The step `load_for_inference` reads: `step`, or the newest in workdir/checkpoints."""
    if step is not None:
        return step
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    return max(int(n) for n in names if n.isdigit())


def report(result: dict) -> str:
    """Human-readable lines: value ± standard error for each figure."""
    lines = [f"step {result['step']}: {result['eval/tokens']:,} target tokens in "
             f"{result['eval/sequences']:,} sequences"
             + (f", {result['eval/bytes']:,} bytes" if "eval/bytes" in result else "")]
    for name in ("loss", "perplexity", "bits_per_byte", "accuracy"):
        if f"eval/{name}" in result:
            lines.append(f"  {name:<14} {result[f'eval/{name}']:.4f} "
                         f"± {result[f'eval/{name}_se']:.4f}")
    return "\n".join(lines)
