# SPDX-License-Identifier: Apache-2.0
"""Hugging Face ``transformers`` integration: a ``transformers`` cache held by kvc, and a
kvpress-like one-shot compression of a context.

    cache = kvc.hf.Cache("snapkv(ratio=0.5)+kivi(bits=2)", model)
    out = model.generate(input_ids, cache=cache, max_new_tokens=32)      # or past_key_values=cache

    with kvc.hf.press(model, "snapkv(ratio=0.5)") as cache:              # compress the context only
        model(context_ids, cache=cache)
    out = model.generate(torch.cat([context_ids, question_ids], 1), cache=cache, max_new_tokens=32)

kvc's page pool holds every layer's K/V (in the spec's storage). At each forward, each layer's
``update`` appends the new K/V and returns the kept K/V gathered from kvc as float32 tensors
(dequantized): that gathered copy is transient (one layer at a time, freed by the model after its
attention), but it is a copy; HF's own attention (eager or sdpa) then reads it.

Positions: after eviction a layer keeps fewer tokens than it has seen. ``get_seq_length`` returns
the tokens seen (what ``transformers`` uses for the next position ids), while the attention mask is
sized by the kept length (``get_query_offset`` and ``get_mask_sizes``), so RoPE positions continue
from the real token count and the mask matches the K/V that ``update`` returns.

Limits of this version (each raises a ``ValueError`` naming it): batch size 1; every kv head and
every layer must keep the same number of tokens (one mask serves all layers); policies that
observe attention weights (h2o, tova, scissorhands, a2sf) or query statistics
(expected_attention), cake, and storages keeping keys before RoPE (``pre_rope=1``) are not
supported; beam search / ``crop`` are not. Needs ``torch`` and ``transformers`` (not needed by
``import kvc``).
"""
from __future__ import annotations

import contextlib

import numpy as np

try:
    import torch
    import transformers
    from transformers.cache_utils import Cache as _HFCache
    from transformers.cache_utils import CacheLayerMixin as _HFLayer
except ModuleNotFoundError as e:  # say what kvc.hf needs, not only what failed
    raise ImportError(f"kvc.hf needs torch and transformers (written against transformers 5.25), but "
                      f"{e.name} is not installed: pip install torch transformers") from e

from . import _kvc

__all__ = ["Cache", "press", "kept_positions"]


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get else config


def _rope_theta(config):
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    theta = getattr(config, "rope_theta", None)
    return float(theta) if theta is not None else None


def _attention_modules(model):
    """The model's self-attention modules, indexed by their ``layer_idx``."""
    found = {}
    for module in model.modules():
        if hasattr(module, "q_proj") and hasattr(module, "layer_idx") and hasattr(module, "head_dim"):
            found[int(module.layer_idx)] = module
    return found


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Layer(_HFLayer):
    """One model layer of a kvc-backed cache: the transformers layer interface over kvc's streams."""

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: "Cache", layer: int):
        super().__init__()
        self._owner = owner
        self._layer = layer

    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._owner._update(self._layer, key_states, value_states)

    def kept(self) -> int:
        return self._owner._kept(self._layer)

    def get_seq_length(self) -> int:
        """Tokens seen by this layer (kept or evicted): the next token's position."""
        return self._owner._seen(self._layer)

    def get_mask_sizes(self, query_length: int):
        return self.kept() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self):
        self._owner.reset()

    def reorder_cache(self, beam_idx):
        raise ValueError("kvc.hf.Cache: reorder_cache (beam search) is not supported, expected num_beams=1")

    def crop(self, tokens_to_remove):
        raise ValueError(f"kvc.hf.Cache: crop(tokens_to_remove={tokens_to_remove}) is not supported "
                         "(assisted/speculative decoding), expected no crop")

    def batch_repeat_interleave(self, repeats):
        raise ValueError(f"kvc.hf.Cache: batch_repeat_interleave(repeats={repeats}) is not supported, "
                         "expected batch size 1")

    def batch_select_indices(self, indices):
        raise ValueError("kvc.hf.Cache: batch_select_indices is not supported, expected batch size 1")


class Cache(_HFCache):
    """A ``transformers`` cache whose K/V kvc holds: ``kvc.hf.Cache(spec, model_or_config)``.

    ``spec`` is a kvc spec, ``[policy+]storage`` (see ``kvc.policies()``, ``kvc.storages()``); with
    no policy and the ``fp32`` storage the cache is exact. Pass the model (not only its config) when
    the policy observes the query window (snapkv, ...): the cache then registers forward pre-hooks
    on the attention modules that recompute each layer's rotated queries (``q_proj`` and the
    model's own cos/sin), and removes them with ``close()``.

    Compression: ``one_shot=False`` (default): after the prompt's forward (``after_prefill``) and
    after every decode step (``after_decode_step``, which compresses only if the policy has a
    decode interval or slack). ``one_shot=True`` (what ``kvc.hf.press`` uses): only at the
    forwards run while ``compressing`` is true, each as a one-shot ``after_prefill`` of the whole
    cache; later tokens are appended and kept.
    """

    def __init__(self, spec: str, model_or_config, *, page_size: int = 16, max_pages: int = 1 << 16,
                 one_shot: bool = False):
        model = None if isinstance(model_or_config, transformers.PretrainedConfig) else model_or_config
        config = model_or_config if model is None else getattr(model_or_config, "config", None)
        if not isinstance(config, transformers.PretrainedConfig):
            raise ValueError(f"kvc.hf.Cache: model_or_config is a {type(model_or_config).__name__}, expected a "
                             "transformers model or its PretrainedConfig")
        text = _text_config(config)
        layers = int(text.num_hidden_layers)
        q_heads = int(text.num_attention_heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or q_heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // q_heads)
        theta = _rope_theta(text)
        kwargs = {"rope_theta": theta} if theta else {}
        self.kvc = _kvc.Cache(spec, num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim,
                              num_q_heads=q_heads, page_size=page_size, max_pages=max_pages, **kwargs)
        observes = self.kvc.observes
        if observes in ("attention", "query_stats"):
            raise ValueError(f"kvc.hf.Cache: spec = '{spec}': the policy observes {observes!r}, which kvc.hf does "
                             "not feed yet; expected a policy observing 'query_window' or 'nothing'")
        if self.kvc.pre_rope_keys:
            raise ValueError(f"kvc.hf.Cache: spec = '{spec}' keeps keys before RoPE (pre_rope=1), but transformers "
                             "hands the cache rotated keys; expected a storage without pre_rope")
        if observes == "query_window" and model is None:
            raise ValueError(f"kvc.hf.Cache: spec = '{spec}': the policy observes the query window, so "
                             "model_or_config must be the model (its attention modules give the queries), "
                             "not its config")
        self.seq = self.kvc.add_sequence()
        self.one_shot = one_shot
        self.compressing = not one_shot
        self.reports = []                 # CompressReport of every layer compressed, in order
        self._queries = [None] * layers   # rolling window of rotated queries per layer, float32 [n, Hq, D]
        self._hooks = []
        self._kept_layer0 = 0
        self._num_kv_heads, self._num_q_heads, self._head_dim = kv_heads, q_heads, head_dim
        super().__init__(layers=[_Layer(self, i) for i in range(layers)])
        if observes == "query_window":
            modules = _attention_modules(model)
            missing = sorted(set(range(layers)) - set(modules))
            if missing:
                raise ValueError(f"kvc.hf.Cache: the model has no attention module (with q_proj and layer_idx) for "
                                 f"layers {missing}, expected one per layer of config.num_hidden_layers={layers}")
            for i in range(layers):
                self._hooks.append(modules[i].register_forward_pre_hook(self._query_hook(i), with_kwargs=True))

    # -- queries ---------------------------------------------------------------------------------
    def _query_hook(self, layer):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
            if hidden.shape[0] != 1:
                return None  # _update raises with the batch size
            with torch.no_grad():
                q = module.q_proj(hidden).view(hidden.shape[0], hidden.shape[1], -1, self._head_dim)
                c, s = cos.unsqueeze(2), sin.unsqueeze(2)          # [B, n, 1, D] against [B, n, Hq, D]
                q = q * c + _rotate_half(q) * s
                q = q[0].detach().to("cpu", torch.float32).contiguous().numpy()
            prev = self._queries[layer]
            q = q if prev is None else np.concatenate([prev, q])
            window = self.kvc.window
            # A copy, not a view: q[-window:] of the prompt's queries would keep all of them alive
            # (4.4 MiB a layer for SmolLM2 at 2,016 tokens, ~133 MiB over 30 layers) until the next step.
            self._queries[layer] = q if window < 0 else q[-window:].copy()
            return None
        return hook

    def close(self):
        """Removes the query hooks from the model."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- the layers' work ------------------------------------------------------------------------
    def _seen(self, layer):
        return self.kvc.seen(self.seq, layer)

    def _kept(self, layer):
        return self.kvc.length(self.seq, layer, 0)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """The kept length: queries sit after what the cache returns, for the causal mask."""
        return self._kept(layer_idx)

    def _gather(self, layer, device, dtype):
        ks, vs = [], []
        for h in range(self._num_kv_heads):
            k, v = self.kvc.gather(self.seq, layer, h)
            ks.append(torch.from_numpy(k))
            vs.append(torch.from_numpy(v))
        lengths = {k.shape[0] for k in ks}
        if len(lengths) != 1:
            raise ValueError(f"kvc.hf.Cache: layer {layer} keeps {[k.shape[0] for k in ks]} tokens per kv head; "
                             "expected equal lengths (transformers' attention takes one mask for every head)")
        k = torch.stack(ks).unsqueeze(0).to(device=device, dtype=dtype)
        v = torch.stack(vs).unsqueeze(0).to(device=device, dtype=dtype)
        return k, v

    def _update(self, layer, key_states, value_states):
        if key_states.dim() != 4 or key_states.shape[0] != 1:
            raise ValueError(f"kvc.hf.Cache: key_states has shape {tuple(key_states.shape)}, expected "
                             f"(1, {self._num_kv_heads}, n, {self._head_dim}): batch size 1")
        kept_before = self._kept(layer)
        if layer == 0:
            self._kept_layer0 = kept_before  # what this forward's mask was sized by
        elif kept_before != self._kept_layer0:
            raise ValueError(f"kvc.hf.Cache: layer {layer} keeps {kept_before} tokens but layer 0 kept "
                             f"{self._kept_layer0}; expected every layer to keep as many (transformers builds one "
                             "mask for all layers)")
        n = key_states.shape[2]
        # [1, H, n, D] -> [n, H, D], float32, C-contiguous, on the CPU: kvc's layout.
        k = key_states[0].detach().transpose(0, 1).to("cpu", torch.float32).contiguous().numpy()
        v = value_states[0].detach().transpose(0, 1).to("cpu", torch.float32).contiguous().numpy()
        self.kvc.append(self.seq, layer, k, v)
        phase = None
        if self.kvc.policy is not None and self.compressing:
            if self.one_shot or kept_before == 0:
                phase = self.kvc.after_prefill
            elif n == 1:
                phase = self.kvc.after_decode_step
        if phase is None:
            return self._gather(layer, key_states.device, key_states.dtype)
        # This forward's queries attend to everything; the compression serves the next forwards.
        out = self._gather(layer, key_states.device, key_states.dtype)
        queries = self._queries[layer] if self.kvc.observes == "query_window" else None
        self.reports.append(phase(self.seq, layer, queries=queries))
        return out

    def reset(self):
        self.kvc.remove_sequence(self.seq)
        self.seq = self.kvc.add_sequence()
        self._queries = [None] * len(self._queries)
        self.reports = []

    # -- reading ---------------------------------------------------------------------------------
    def kept_positions(self):
        """The original positions each (layer, kv head) stream keeps: a list of lists of int lists."""
        return [[self.kvc.positions(self.seq, layer, h).tolist() for h in range(self._num_kv_heads)]
                for layer in range(len(self.layers))]

    def bytes_in_use(self) -> int:
        """Page-pool bytes kvc holds for this cache."""
        return self.kvc.bytes_in_use()

    def __repr__(self):
        return f"kvc.hf.Cache('{self.kvc.spec}', layers={len(self.layers)}, seen={self._seen(0)}, kept={self._kept(0)})"


@contextlib.contextmanager
def press(model, spec: str, **kwargs):
    """One-shot compression of a context, as kvpress's pipeline does: the forwards run inside the
    ``with`` block (the context's prefill) are compressed once each layer has its K/V; after the
    block the cache stops compressing, so the question and the generated tokens are kept whole.

        with kvc.hf.press(model, "snapkv(ratio=0.5)") as cache:
            model(context_ids, cache=cache)
        model.generate(full_ids, cache=cache, ...)      # full_ids = context + question

    The query hooks are removed when the block ends. ``kwargs`` go to ``kvc.hf.Cache``."""
    cache = Cache(spec, model, one_shot=True, **kwargs)
    cache.compressing = True
    try:
        yield cache
    finally:
        cache.compressing = False
        cache.close()
        cache._queries = [None] * len(cache._queries)  # no longer read: later forwards are not compressed


def kept_positions(cache: Cache):
    """``cache.kept_positions()``: the original positions every (layer, kv head) stream keeps."""
    return cache.kept_positions()
