"""`lmjax eval`: loss, perplexity, bits per byte and token accuracy of a run, with standard errors.

    lmjax eval --workdir=DIR                       # the run's held-out split
    lmjax eval --workdir=DIR --split=train         # or its training text
    lmjax eval --workdir=DIR --text='notes/*.txt'  # or any local UTF-8 files, all of them
    lmjax eval --workdir=DIR --stride=64 --stride=256 --config.data.seq_len=512  # sliding windows

Bits per byte divide the summed loss (converted to bits) by the UTF-8 bytes the target tokens
decode to, so runs with different tokenizers compare (Gao et al. 2020, The Pile). Text is scored
as training sees it: rows of seq_len targets cut from one token stream with an EOS after each
document, every transition scored once, the last row padded with zero-weight targets.
With a stride S < seq_len (`--stride`, data.eval_stride) a window of seq_len tokens moves S
tokens at a time and scores only the targets the previous window did not: every token is still
scored once, now with at least seq_len - S tokens before it (Hugging Face's "perplexity of
fixed-length models"); the first window scores all of its targets. S = seq_len is the default.
Standard errors treat sequences (rows) as the independent units, since tokens within a row are
correlated: a ratio estimator over per-row sums, and the delta method for perplexity.

The model is restored onto the run's mesh and rules and batches are split over the batch axes,
exactly as in training (`--config.mesh.*` lays it out differently); every process computes the
same rows and takes its own part of each global batch.
"""

import math

import jax
import ml_collections
import numpy as np
import sentencepiece as spm
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lmjax import config as config_lib
from lmjax import inference, loss, paths, sharding, validate
from lmjax.data import pipeline, sources
from lmjax.data.tokenizer import Tokenizer
from lmjax.model import forward

SPLITS = ("eval", "train", "all")
# Model keys an evaluation may change: none changes a parameter, so the checkpoint still loads
# (score a model at a longer context with RoPE scaling, or with another attention window).
MODEL_OVERRIDES = ("model.rope_scaling", "model.rope_original_max_len", "model.rope_yarn_",
                   "model.attention_window")


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


def windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first scored, end) of each window over transitions 0..n-1 (transition t predicts
    token t + 1 from tokens 0..t): the window's inputs are tokens begin..end-1 and it scores
    transitions first..end-1, those the previous window did not reach. Windows begin every
    `stride` tokens, so a scored transition t has t - begin >= seq_len - stride earlier tokens in
    its window (all of its history in the first)."""
    if not 1 <= stride <= seq_len:
        raise ValueError(f"The evaluation stride {stride} must be between 1 and the context "
                         f"seq_len={seq_len}.")
    out, scored = [], 0
    for begin in range(0, max(n, 1), stride):
        end = min(begin + seq_len, n)
        out.append((begin, scored, end))
        scored = end
        if end == n:
            break
    return out


def strided_rows(stream: np.ndarray, seq_len: int, stride: int) -> dict[str, np.ndarray]:
    """Rows of `windows`: inputs, targets, weights [R, seq_len]; weight 1 on scored targets.
    stride = seq_len gives stream_rows' rows."""
    n = len(stream) - 1
    spans = windows(n, seq_len, stride)
    padded = np.zeros(spans[-1][0] + seq_len + 1, np.int32)
    padded[: len(stream)] = stream
    begin_R1 = np.array([b for b, _, _ in spans])[:, None]
    index_RL = begin_R1 + np.arange(seq_len)[None, :]
    first_R1, end_R1 = (np.array([[f, e] for _, f, e in spans]).T)[:, :, None]
    weights_RL = (index_RL >= first_R1) & (index_RL < end_R1)
    return {"inputs": padded[index_RL], "targets": padded[index_RL + 1],
            "weights": weights_RL.astype(np.float32)}


def _rows(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer | None, split: str,
          max_rows: int) -> dict[str, np.ndarray]:
    d = cfg.data
    if d.source in pipeline.TEXT_LIKE:  # text files, or jsonl / parquet / hf records
        train, held_out = pipeline.streams(cfg, tokenizer, 0.0 if split == "all" else None)
        stream = held_out if split == "eval" else train
        if len(stream) < 2:
            raise ValueError(f"The {split!r} split of data.text={d.text!r} has no tokens to "
                             "score (is data.eval_fraction 0?).")
        rows = strided_rows(stream, d.seq_len, d.eval_stride or d.seq_len)
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
        raise ValueError(f"lmjax eval reads data.source {', '.join(pipeline.TEXT_LIKE)} or "
                         f"synthetic, not {d.source!r}; its training run reports eval/loss in "
                         f"metrics.jsonl.")
    if max_rows:
        rows = {k: v[:max_rows] for k, v in rows.items()}
    return rows


def _row_sums(graphdef: nnx.GraphDef, state: nnx.State, batch: dict) -> dict:
    """Per-row sums of the loss and correct predictions, and target counts, from loss.py."""
    logits_BLV = forward(nnx.merge(graphdef, state), batch)

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
             devices=None, stride: int | None = None) -> dict:
    """Figures of the run in `workdir` (latest or given step) on `split` of its data, or on all
    of `text` (a shipped name, a glob or a folder, local or gs://); at most `batches` global
    batches (0: every row). `overrides` ('data.x=y', 'mesh.x=y', MODEL_OVERRIDES) change what
    is read, how it is laid out and how positions are encoded; `stride` (1..data.seq_len)
    slides the windows."""
    if split not in SPLITS:
        raise ValueError(f"--split={split!r} is not one of {SPLITS}.")
    if stride is not None and stride < 1:
        raise ValueError(f"--stride={stride} must be at least 1: windows must move forward.")
    cfg = config_lib.from_workdir(workdir)
    for item in ([f"data.text={text}"] if text else []) + list(overrides) + (
            [f"data.eval_stride={stride}"] if stride else []):
        key, sep, value = item.partition("=")
        if not sep or not key.startswith(("data.", "mesh.") + MODEL_OVERRIDES):
            raise ValueError(f"lmjax eval takes --config.data.*, --config.mesh.* and "
                             f"{', '.join(MODEL_OVERRIDES)}* overrides only, not {item!r}: the "
                             f"model is the checkpoint's.")
        config_lib.set_value(cfg, key, value)
    if stride:  # passed on to each source of a mixture
        overrides = (*overrides, f"data.eval_stride={stride}")
    devices = jax.devices() if devices is None else devices
    validate.validate(cfg, len(devices))
    if cfg.data.mixture and not text:
        return evaluate_mixture(workdir, cfg.data.mixture, split=split, step=step,
                                batches=batches, overrides=overrides, devices=devices)
    mesh = sharding.make_mesh(cfg, devices)
    model, _, tokenizer = inference.load(workdir, step, mesh, cfg)
    if cfg.data.source in pipeline.TEXT_LIKE and tokenizer is None:
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
    if cfg.data.source in pipeline.TEXT_LIKE:
        result.update({"eval/context": cfg.data.seq_len,
                       "eval/stride": cfg.data.eval_stride or cfg.data.seq_len})
    return {"step": checkpoint_step(workdir, step), **result}


def evaluate_mixture(workdir: str, spec: str, *, split: str, step: int | None, batches: int,
                     overrides: tuple[str, ...], devices) -> dict:
    """Figures of every source of `data.mixture` on its own (its held-out tail for split
    'eval', as in training), as `eval/<name>/<figure>`, and pooled over all sources' text
    (`eval/<figure>`: total nats over total tokens and over ln 2 x total bytes; weight-0
    sources included). A source's split is the one its text alone would have."""
    from lmjax.data import mixture

    out, sources = {}, mixture.parse(spec)
    for source in sources:
        one = evaluate(workdir, split=split, step=step, batches=batches, devices=devices,
                       overrides=(*overrides, f"data.text={source.pattern}", "data.mixture="))
        out["step"] = one.pop("step")
        out.update({f"eval/{source.name}/{k[len('eval/'):]}": v for k, v in one.items()})
    names = [s.name for s in sources]
    tokens = sum(out[f"eval/{n}/tokens"] for n in names)
    nats = sum(out[f"eval/{n}/loss"] * out[f"eval/{n}/tokens"] for n in names)
    out.update({"eval/loss": nats / tokens, "eval/perplexity": math.exp(nats / tokens),
                "eval/tokens": tokens,
                "eval/sequences": sum(out[f"eval/{n}/sequences"] for n in names)})
    if all(f"eval/{n}/bytes" in out for n in names):
        out["eval/bytes"] = sum(out[f"eval/{n}/bytes"] for n in names)
        out["eval/bits_per_byte"] = nats / (math.log(2) * out["eval/bytes"])
    return out


def checkpoint_step(workdir: str, step: int | None) -> int:
    """The step `inference.load` reads: `step`, or the newest in workdir/checkpoints."""
    if step is not None:
        return step
    names = [p.name for p in (paths.resolve(workdir) / "checkpoints").iterdir()]
    return max(int(n) for n in names if n.isdigit())


def stride_table(results: list[dict]) -> str:
    """Markdown table of perplexity by stride: smaller strides give each token more history (and
    cost context / stride forward passes per window of new tokens)."""
    lines = ["| context | stride | windows | tokens | loss | perplexity | bits/byte |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        bpb = f"{r['eval/bits_per_byte']:.4f}" if "eval/bits_per_byte" in r else ""
        lines.append(f"| {r['eval/context']} | {r['eval/stride']} | {r['eval/sequences']:,} | "
                     f"{r['eval/tokens']:,} | {r['eval/loss']:.4f} ± {r['eval/loss_se']:.4f} | "
                     f"{r['eval/perplexity']:.2f} | {bpb} |")
    return "\n".join(lines)


def report(result: dict) -> str:
    """Human-readable lines: value ± standard error for each figure."""
    lines = [f"step {result['step']}: {result['eval/tokens']:,} target tokens in "
             f"{result['eval/sequences']:,} sequences"
             + (f", {result['eval/bytes']:,} bytes" if "eval/bytes" in result else "")]
    for name in ("loss", "perplexity", "bits_per_byte", "accuracy"):
        if f"eval/{name}_se" in result:
            lines.append(f"  {name:<14} {result[f'eval/{name}']:.4f} "
                         f"± {result[f'eval/{name}_se']:.4f}")
        elif f"eval/{name}" in result:  # pooled over a mixture's sources: no s.e.
            lines.append(f"  {name:<14} {result[f'eval/{name}']:.4f}")
    sources_ = list(dict.fromkeys(k.split("/")[1] for k in result if k.count("/") == 2))
    if sources_:
        lines.append(f"  {'source':<10} {'tokens':>10} {'bytes':>11} {'loss':>16} "
                     f"{'bits/byte':>16}")
    for name in sources_:
        r = {k.split("/")[2]: v for k, v in result.items() if k.startswith(f"eval/{name}/")}
        bpb = (f"{r['bits_per_byte']:.4f} ± {r['bits_per_byte_se']:.4f}"
               if "bits_per_byte" in r else "")
        lines.append(f"  {name:<10} {r['tokens']:>10,} {r.get('bytes', 0):>11,} "
                     f"{r['loss']:.4f} ± {r['loss_se']:.4f} {bpb:>16}")
    return "\n".join(lines)
