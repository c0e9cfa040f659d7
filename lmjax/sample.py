"""Autoregressive sampling with a KV cache: greedy, temperature, top-k, top-p, stop tokens.

`sample` knows nothing about the model (Flax lm1b): it drives
`tokens_to_logits(tokens_BL, cache) -> (logits_BLV, cache)` inside one `lax.while_loop`, so a
fake `tokens_to_logits` with a known answer tests it. `generate` binds it to a Transformer:
prompts of different lengths are left-padded to a shape bucket (a power of two), every row
writes the same cache slot, and each row's positions count from its own first token
(Transformer.init_cache); a Generator compiles once per padded shape and reuses it.
"""

import functools
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmjax import inference
from lmjax.model import Transformer

TokensToLogits = Callable[[jax.Array, object], tuple[jax.Array, object]]
MIN_BUCKET = 16  # shortest padded prompt: tiny prompts share one compilation


def filter_logits(logits_BV: jax.Array, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """Logits whose softmax is the sampling distribution: scaled by 1/temperature, then all but
    the k most likely tokens and then all outside the smallest set holding mass top_p (nucleus,
    Holtzman et al. 2020) set to -inf. temperature must be > 0; top_k 0 and top_p 1 are off."""
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of more likely tokens
        kept_BV = jnp.where(mass_before_BV < top_p, sorted_BV, jnp.inf)
        cutoff_B1 = jnp.min(kept_BV, axis=-1, keepdims=True)  # least likely token still kept
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return logits_BV


def choose(logits_BV: jax.Array, key: jax.Array, temperature: float, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
    """Next token of each row; temperature 0 is greedy (argmax), whatever top_k and top_p."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    filtered_BV = filter_logits(logits_BV, temperature, top_k, top_p)
    return jax.random.categorical(key, filtered_BV, axis=-1).astype(jnp.int32)


def sample(tokens_to_logits: TokensToLogits, cache, prompt_BP: jax.Array, key: jax.Array, *,
           max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           stop_ids: Sequence[int] = (), pad_id: int = 0,
           on_token: Callable[[np.ndarray, np.ndarray], None] | None = None) -> jax.Array:
    """New tokens [B, max_new_tokens] after each (left-padded) prompt row.

    The prompt goes through `tokens_to_logits` in one call (prefill), then one token per
    iteration. A row that emits a stop id keeps it and is padded with `pad_id` after; the loop
    ends when every row has stopped or max_new_tokens are out. `on_token(step, tokens_B)` is
    called from inside the loop, in order, for streaming to a terminal.
    """
    B = prompt_BP.shape[0]
    logits_BPV, cache = tokens_to_logits(prompt_BP, cache)
    stop_S = jnp.asarray(list(stop_ids) or [-1], jnp.int32)

    def cond(carry):
        i, _, done_B, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done_B)

    def body(carry):
        i, logits_BV, done_B, out_BT, cache = carry
        token_B = choose(logits_BV, jax.random.fold_in(key, i), temperature, top_k, top_p)
        token_B = jnp.where(done_B, pad_id, token_B)
        if on_token is not None:
            jax.debug.callback(on_token, i, token_B, ordered=True)
        out_BT = out_BT.at[:, i].set(token_B)
        done_B = done_B | jnp.isin(token_B, stop_S)
        logits_B1V, cache = tokens_to_logits(token_B[:, None], cache)
        return i + 1, logits_B1V[:, -1], done_B, out_BT, cache

    carry = (jnp.int32(0), logits_BPV[:, -1], jnp.zeros((B,), bool),
             jnp.full((B, max_new_tokens), pad_id, jnp.int32), cache)
    return jax.lax.while_loop(cond, body, carry)[3]


def bucket(length: int) -> int:
    """Padded prompt length: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(length - 1, 0).bit_length())


def _generate(graphdef, state, prompt_BP, start_B, key, *, max_new_tokens, temperature, top_k,
              top_p, stop_ids, pad_id, on_token):
    model = nnx.merge(graphdef, state)
    model.init_cache(start_B, prompt_BP.shape[1] + max_new_tokens)
    cache_def, cache, rest = nnx.split(model, nnx.Cache, ...)

    def tokens_to_logits(tokens_BL, cache):
        decoder = nnx.merge(cache_def, cache, rest)
        # Decoding calls the module on tokens, not model.forward on a batch: there are no
        # packed segments here, and positions come from the KV cache (Transformer.init_cache).
        logits_BLV = decoder(tokens_BL)
        return logits_BLV, nnx.state(decoder, nnx.Cache)

    return sample(tokens_to_logits, cache, prompt_BP, key, max_new_tokens=max_new_tokens,
                  temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=stop_ids,
                  pad_id=pad_id, on_token=on_token)


class Generator:
    """A Transformer bound to a jitted sampler: one compilation per (batch size,
    bucket(longest prompt), sampling settings), reused by every later call that matches."""

    def __init__(self, model: Transformer):
        self.cfg = model.cfg
        graphdef, self.state = nnx.split(model)  # the graphdef holds a ConfigDict: not hashable
        self._run = jax.jit(functools.partial(_generate, graphdef), static_argnames=(
            "max_new_tokens", "temperature", "top_k", "top_p", "stop_ids", "pad_id", "on_token"))

    def __call__(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 stop_ids: Sequence[int] = (), pad_id: int = 0, seed: int = 0,
                 on_token: Callable[[np.ndarray, np.ndarray], None] | None = None
                 ) -> list[list[int]]:
        """Continue each prompt (token ids, at least one each); returns the new ids of each,
        cut after its first stop id."""
        self.check(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p)
        P = bucket(max(len(p) for p in prompts))
        prompt_BP = np.full((len(prompts), P), pad_id, np.int32)
        for row, ids in zip(prompt_BP, prompts, strict=True):
            row[P - len(ids):] = ids
        start_B = np.array([P - len(p) for p in prompts], np.int32)
        out_BT = self._run(self.state, prompt_BP, start_B, jax.random.key(seed),
                           max_new_tokens=max_new_tokens, temperature=float(temperature),
                           top_k=int(top_k), top_p=float(top_p), stop_ids=tuple(stop_ids),
                           pad_id=int(pad_id), on_token=on_token)
        result = []
        for row in np.asarray(out_BT).tolist():
            stops = [i for i, t in enumerate(row) if t in stop_ids]
            result.append(row[: stops[0] + 1] if stops else row)
        return result

    def check(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
              temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> None:
        """The request's one-sentence ValueError, if any, raised before anything is printed
        or compiled."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("Every prompt needs at least one token (e.g. the EOS that starts a "
                             "document).")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1.")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"Sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1; "
                             f"got temperature={temperature}, top_k={top_k}, top_p={top_p}.")
        longest = max(len(p) for p in prompts)
        if self.cfg.position == "learned" and longest + max_new_tokens > self.cfg.max_len:
            raise ValueError(f"A prompt of {longest} tokens plus max_new_tokens={max_new_tokens} "
                             f"exceeds the model's {self.cfg.max_len} learned positions.")


def main(workdir: str, prompts: Sequence[str], *, step: int | None = None,
         max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 0,
         top_p: float = 0.95, seed: int = 0, out=None) -> list[str]:
    """`lmjax sample`: continue each prompt with the run's model; one prompt streams token by
    token, several print in turn. Each prompt follows an EOS, the document boundary the model
    was trained on, and a document ends at the next EOS. Returns the continuations."""
    out = out or sys.stdout
    model, _, tokenizer = inference.load(workdir, step)
    if tokenizer is None:
        raise FileNotFoundError(f"{workdir} has no tokenizer.model to encode prompts with.")
    prompts = list(prompts) or [""]
    ids = [[tokenizer.eos_id] + p for p in tokenizer.encode(prompts)]
    streamed: list[int] = []
    shown = [0]  # characters of the decoded continuation already printed

    def show(_, token_B):
        streamed.append(int(token_B[0]))
        text = tokenizer.decode(streamed)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[shown[0]:])
            out.flush()
            shown[0] = len(text)

    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, stop_ids=(tokenizer.eos_id,), pad_id=tokenizer.pad_id, seed=seed)
    generator = Generator(model)
    generator.check(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p)  # its error alone, not after the echoed prompt
    if len(prompts) == 1:
        out.write(prompts[0])
        new = generator(ids, on_token=show, **settings)
        text = tokenizer.decode(new[0])
        out.write(text[shown[0]:] + "\n")
        return [text]
    texts = [tokenizer.decode(n) for n in generator(ids, **settings)]
    for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        out.write(f"--- sample {i + 1} ---\n{prompt}{text}\n")
    return texts
