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

Batches: each row of the batch is a kvc sequence of its own (created at the first forward, from
the batch size it brings), compressed on its own queries. Beam search (``reorder_cache``, which
``generate`` calls) and the batch reshaping calls (``batch_repeat_interleave``,
``batch_select_indices``) fork and drop those sequences: a row continued by several beams is forked, and the forks share its pages
until they write to them (copy on write). ``generate`` expands the prompt to one row per beam
before the first forward, so each beam starts with its own copy; sharing comes with the first
reorder that continues one beam twice.

Limits of this version (each raises a ``ValueError`` naming it): every kv head, layer and row must
keep the same number of tokens (one mask serves all of them); a policy with a batch that has
padding (rows of unequal length: kept tokens would no longer line up with the attention mask's
columns), and a policy with a batch of more than one row where the padding cannot be seen (the
check reads the 2D ``attention_mask`` the model's forward is given, so it needs the model, not its
config); a policy observing query statistics (expected_attention) with more than one row (kvc
keeps the statistics per layer, not per sequence); cake, and storages keeping keys before RoPE
(``pre_rope=1``: also palu, and xkv unless ``pre_rope=0``) are not supported. ``crop`` (assisted and speculative decoding) forgets the newest
tokens of every row, except while a policy compresses (use ``press`` for the context) and for
storages that cannot rewind (merging stages, low-rank, mixed precision).

Policies observing attention (h2o, tova, scissorhands, a2sf) are fed as kvc-llama feeds them: each
token of a forward is appended alone and its rotated query (from the query hooks) attends over
what its row keeps, through kvc's kernel, which feeds the observer; the output is discarded, as
transformers attends over the gathered copy. That is a second attention per token and layer.
Low-rank storages: ``pca(...)`` fits its bases on the prompt's first forward (at least ``rank``
tokens). ``think(...)`` and ``xkv(pre_rope=0, ...)`` observe the end of the prompt
(``kvc.Cache.observe_window``), which transformers' cache API does not signal and whose queries it
does not pass: with the model, the same query hooks give each layer's last rotated queries, and
``update`` calls ``observe_window`` after the prompt's forward (or each forward of ``press``),
after any eviction; the prompt's own forward attends over the whole rows, the next ones over the
pruned channels or the latents. Built from the config only, these two raise ``ValueError``.
Expected Attention (query statistics) gets each forward's queries before RoPE from the same hooks
(``kvc.Cache.observe_queries``), as kvc-llama hands them over. Needs ``torch`` and ``transformers`` (not needed by ``import kvc``).
"""
from __future__ import annotations

import contextlib
import weakref

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

# Attention with each kept token's log-weight on its logit (merging stages with mass: d2o,
# kvmerger), registered once with transformers under this name; a log-weighted kvc.hf.Cache
# switches its model to it while it lives.
_LOG_WEIGHTED = "kvc_log_weighted"


def _log_weighted_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' eager attention, plus the log-weights kvc.hf.Cache left on the module for the
    keys it returned: logit = scaling * q.k + mask + lw. A module without them (another cache's
    forward) gets eager attention unchanged."""
    held = module.__dict__.pop("_kvc_log_weights", None)  # read once, for the keys it was taken with
    if held is not None and held[0] is not key:
        raise ValueError(f"kvc.hf: layer {getattr(module, 'layer_idx', '?')}'s attention got keys other than those the "
                         "kvc cache returned (the model changed them after cache.update), so their log-weights "
                         "cannot be matched to them; expected a Llama-family attention that reads the cache's keys "
                         "as returned")
    unsupported = [k for k in ("softcap", "sliding_window", "s_aux", "sinks") if kwargs.get(k) is not None]
    if held is not None and unsupported:
        raise ValueError(f"kvc.hf: layer {getattr(module, 'layer_idx', '?')}'s attention asks for {unsupported}, which "
                         "kvc's log-weighted attention does not implement; expected a Llama-family attention")
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1)  # query head h reads kv head h // group
    v = value.repeat_interleave(group, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, k.transpose(2, 3)) * scale
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : k.shape[-2]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if held is not None:
        lw = held[1].to(device=scores.device, dtype=scores.dtype)  # [B, Hkv, n]
        scores = scores + lw.repeat_interleave(group, dim=1)[:, :, None, :]
    p = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    p = torch.nn.functional.dropout(p, p=dropout, training=module.training)
    return torch.matmul(p, v).transpose(1, 2).contiguous(), p


def _register_log_weighted_attention():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    AttentionInterface.register(_LOG_WEIGHTED, _log_weighted_attention)
    AttentionMaskInterface.register(_LOG_WEIGHTED, eager_mask)  # an additive float mask, always built


def _hold_attention(model):
    """Switches the model to _LOG_WEIGHTED for one more cache; the first switch remembers what it had."""
    users = getattr(model, "_kvc_log_weighted_users", 0)
    if users == 0:
        model._kvc_attn_before = model.config._attn_implementation
        model.set_attn_implementation(_LOG_WEIGHTED)
    model._kvc_log_weighted_users = users + 1


def _release_attention(model_ref):
    """One cache fewer; the last one gives the model back its attention implementation."""
    model = model_ref()
    if model is None:
        return
    model._kvc_log_weighted_users = max(0, getattr(model, "_kvc_log_weighted_users", 0) - 1)
    if model._kvc_log_weighted_users == 0 and model.config._attn_implementation == _LOG_WEIGHTED:
        model.set_attn_implementation(model._kvc_attn_before)

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

    # The rows are kvc sequences shared by every layer: they are reshaped once, by the cache.
    def reorder_cache(self, beam_idx):
        raise ValueError("kvc.hf.Cache: reorder_cache on one layer; expected it on the cache (its rows are kvc "
                         "sequences that every layer shares)")

    @property
    def is_croppable(self) -> bool:
        return self._owner.is_croppable

    def crop(self, tokens_to_remove):
        raise ValueError(f"kvc.hf.Cache: crop({tokens_to_remove}) on one layer; expected it on the cache (every "
                         "layer of a row is rewound together)")

    def batch_repeat_interleave(self, repeats):
        raise ValueError("kvc.hf.Cache: batch_repeat_interleave on one layer; expected it on the cache")

    def batch_select_indices(self, indices):
        raise ValueError("kvc.hf.Cache: batch_select_indices on one layer; expected it on the cache")


class Cache(_HFCache):
    """A ``transformers`` cache whose K/V kvc holds: ``kvc.hf.Cache(spec, model_or_config)``.

    ``spec`` is a kvc spec, ``[policy+[merging+]]storage`` (see ``kvc.policies()``,
    ``kvc.storages()``); with no policy and the ``fp32`` storage the cache is exact. A merging
    stage whose merged tokens carry log-weights (``d2o``, ``kvmerger``; mass=1 by default) needs
    the model: the cache switches it to kvc's attention implementation (transformers' eager
    attention with each kept token's log-weight added to its logit) for as long as the cache
    exists, ``close()`` and ``press``'s end included (the cache may still generate); the last such
    cache of a model to be garbage-collected switches it back. Pass the model (not only its config) when
    the policy observes queries (the query window: snapkv, ...; attention: h2o, tova, ...; query
    statistics: expected_attention): the cache then registers forward pre-hooks on the attention
    modules that recompute each layer's queries (``q_proj``, ``q_norm`` where the model has one,
    and the model's own cos/sin), and removes them with ``close()``. With a policy and the model it
    also hooks the model's forward to read the batch's padding from its 2D ``attention_mask``; that
    hook lasts as long as the cache.

    Compression: ``one_shot=False`` (default): after the prompt's forward (``after_prefill``) and
    after every decode step (``after_decode_step``, which compresses only if the policy has a
    decode interval or slack). ``one_shot=True`` (what ``kvc.hf.press`` uses): only at the
    forwards run while ``compressing`` is true, each as a one-shot ``after_prefill`` of the whole
    cache; later tokens are appended and kept. ``minicache(...)`` (no policy) merges its layer pairs
    once the first forward (the prompt, or press's context) is in every layer
    (``kvc.Cache.cross_layer_merge``; one ``LayerMergeReport`` per row in ``layer_merges``); that
    forward attends over the rows as appended, the next ones over the merged rows.
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
        self._kvc_args = dict(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim, num_q_heads=q_heads,
                              page_size=page_size, max_pages=max_pages, **kwargs)
        storage_name = _storage_name(spec)
        if storage_name == "palu":
            raise ValueError(f"kvc.hf.Cache: spec = '{spec}': palu stores a latent of the keys before RoPE and "
                             "takes its bases from the model's W_k and W_v, but transformers hands the cache "
                             "rotated keys; expected pca(...), think(...) or xkv(pre_rope=0, ...), or kvc.Cache "
                             "with weights=(wk, wv) and rope_theta driven by your own loop")
        self.kvc = _kvc.Cache(spec, **self._kvc_args)
        if self.kvc.cake:
            raise ValueError(f"kvc.hf.Cache: spec = '{spec}': policy 'cake' gives each layer a budget of its own, but "
                             "transformers takes one attention mask for every layer; expected a policy with one "
                             "budget for all layers, or kvc.Cache (cake_allocate) with your own attention")
        observes = self.kvc.observes
        self._lowrank = storage_name in ("pca", "think", "xkv")  # bases / channels fitted on the prompt
        self._minicache = storage_name == "minicache"  # layer pairs merged once the prompt is in every layer
        self._storage_window = self.kvc.query_window  # think: its window; xkv: 1 (end of prompt); else 0
        if self.kvc.pre_rope_keys:
            raise ValueError(f"kvc.hf.Cache: spec = '{spec}' keeps keys before RoPE (pre_rope=1), but transformers "
                             "hands the cache rotated keys; expected a storage without pre_rope")
        if self.kvc.log_weighted and model is None:
            raise ValueError(f"kvc.hf.Cache: spec = '{spec}': merging stage '{self.kvc.merging}' gives merged tokens "
                             "log-weights (the attention mass they stand for), which transformers' attention adds "
                             "only through kvc's attention implementation, so model_or_config must be the model "
                             "(not its config); or a merging stage without mass (cam, or d2o / kvmerger with mass=0)")
        if observes in ("query_window", "attention", "query_stats") and model is None:
            raise ValueError(f"kvc.hf.Cache: spec = '{spec}': the policy observes {observes.replace('_', ' ')}, so "
                             "model_or_config must be the model (its attention modules give the queries), "
                             "not its config")
        if self._storage_window > 0 and model is None:
            raise ValueError(f"kvc.hf.Cache: spec = '{spec}': storage '{self.kvc.storage}' observes the prompt's last "
                             f"{self._storage_window} rotated queries of each layer at the end of the prompt "
                             "(kvc.Cache.observe_window), which transformers' cache API does not pass, so "
                             "model_or_config must be the model (its attention modules give the queries), not its "
                             "config")
        self.seqs = [self.kvc.add_sequence()]  # one kvc sequence per row of the batch
        self.spec = spec
        self.one_shot = one_shot
        self.compressing = not one_shot
        self.reports = []                 # CompressReport of every (layer, row) compressed, in order
        self.layer_merges = []            # minicache: a LayerMergeReport per row, after the prompt
        self._queries = [None] * layers   # rolling window of rotated queries per layer, float32 [B, n, Hq, D]
        self._storage_queries = [None] * layers  # the storage's window of this forward, float32 [B, n, Hq, D]
        self._scaling = [None] * layers   # each attention module's softmax scale (kvc.Cache.attention's scale)
        self._hooks = []
        self._padded = None               # this forward's 2D mask hides a token (the model's hook); None: unknown
        self._mask_hooked = False
        self._queries_before = None       # (layer, window) before the last query hook ran: restored on a refusal
        self._kept_layer0 = 0
        self._num_kv_heads, self._num_q_heads, self._head_dim = kv_heads, q_heads, head_dim
        self._lw_modules = None           # the attention modules log-weights are left on (log-weighted stages)
        self._attn_restore = None         # switches the model back from kvc's attention implementation (finalizer)
        super().__init__(layers=[_Layer(self, i) for i in range(layers)])
        policy_queries = self.kvc.policy is not None and observes in ("query_window", "attention", "query_stats")
        modules = None
        if model is not None and (self.kvc.policy is not None or self._storage_window > 0 or self.kvc.log_weighted):
            modules = _attention_modules(model)
            missing = sorted(set(range(layers)) - set(modules))
            if missing:
                raise ValueError(f"kvc.hf.Cache: the model has no attention module (with q_proj and layer_idx) for "
                                 f"layers {missing}, expected one per layer of config.num_hidden_layers={layers}")
        if model is not None and self.kvc.policy is not None:
            # The padding check lives as long as the cache (close() keeps it: evicted rows stay
            # misaligned with a padded mask after compression stops); a weak reference, so the
            # model does not keep the cache and its pages alive.
            handle = model.register_forward_pre_hook(_mask_hook(weakref.ref(self)), with_kwargs=True)
            weakref.finalize(self, handle.remove)
            self._mask_hooked = True
        if self.kvc.log_weighted:
            _register_log_weighted_attention()
            self._lw_modules = modules
            _hold_attention(model)
            self._attn_restore = weakref.finalize(self, _release_attention, weakref.ref(model))
        if modules is not None and (policy_queries or self._storage_window > 0):
            for i in range(layers):
                self._hooks.append(modules[i].register_forward_pre_hook(self._query_hook(i), with_kwargs=True))

    @property
    def seq(self):
        """The kvc sequence of the batch's first row (the only one at batch size 1)."""
        return self.seqs[0]

    # -- queries ---------------------------------------------------------------------------------
    def _query_hook(self, layer):
        def hook(module, args, kwargs):
            if _forward_cache(kwargs) is not self:
                return None  # another cache's forward
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
            observes = self.kvc.observes if self.kvc.policy is not None else "nothing"
            stats = observes == "query_stats"  # Expected Attention: the queries before RoPE
            # The storage's window (think, xkv): this forward's last rotated queries, at the forward
            # _update observes it (the prompt's); none computed at the others.
            storage = self._storage_window > 0 and self._observes_storage(self._seen(layer) == 0)
            self._storage_queries[layer] = None
            policy = observes != "nothing"
            if observes in ("attention", "query_stats") and not self.compressing:
                self._queries[layer] = None  # read only while compressing: no query kept, none computed
                policy = False
            if not policy and not storage:
                return None
            self._scaling[layer] = getattr(module, "scaling", None)
            with torch.no_grad():
                q = module.q_proj(hidden).view(hidden.shape[0], hidden.shape[1], -1, self._head_dim)
                if getattr(module, "q_norm", None) is not None:  # Qwen3 and kin normalise q before RoPE
                    q = module.q_norm(q)
                rotated = None
                if storage or not stats:
                    c, s = cos.unsqueeze(2), sin.unsqueeze(2)          # [B, n, 1, D] against [B, n, Hq, D]
                    rotated = q * c + _rotate_half(q) * s
                q = (q if stats else rotated).detach().to("cpu", torch.float32).contiguous().numpy()  # [B, n, Hq, D]
                if storage:
                    w = rotated[:, -self._storage_window:].detach().to("cpu", torch.float32).contiguous().numpy()
                    self._storage_queries[layer] = w
            if not policy:
                return None
            prev = self._queries[layer]
            self._queries_before = (layer, prev)
            if observes in ("attention", "query_stats"):  # this forward's queries, used in _update
                self._queries[layer] = q
                return None
            q = q if prev is None or prev.shape[0] != q.shape[0] else np.concatenate([prev, q], axis=1)
            window = self.kvc.window
            # A copy, not a view: q[:, -window:] of the prompt's queries would keep all of them alive
            # (4.4 MiB a layer for SmolLM2 at 2,016 tokens, ~133 MiB over 30 layers) until the next step.
            self._queries[layer] = q if window < 0 else q[:, -window:].copy()
            return None
        return hook

    def _observes_storage(self, first_forward):
        """Whether this forward ends the prompt for the storage's observe_window: the forwards that
        compress (press), or the first one (the prompt) otherwise."""
        return self.compressing and (self.one_shot or first_forward)

    def close(self):
        """Removes the query hooks from the model. (A log-weighted stage's attention implementation
        stays until the cache is garbage-collected: the cache may still be used.)"""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- the layers' work ------------------------------------------------------------------------
    def _seen(self, layer):
        return self.kvc.seen(self.seq, layer)

    def _kept(self, layer):
        return self.kvc.length(self.seqs[0], layer, 0)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """The kept length: queries sit after what the cache returns, for the causal mask."""
        return self._kept(layer_idx)

    def _gather(self, layer, device, dtype):
        rows_k, rows_v, lengths = [], [], []
        for seq in self.seqs:
            ks, vs = [], []
            for h in range(self._num_kv_heads):
                k, v = self.kvc.gather(seq, layer, h)
                ks.append(torch.from_numpy(k))
                vs.append(torch.from_numpy(v))
            lengths.append([k.shape[0] for k in ks])
            rows_k.append(torch.stack(ks))
            rows_v.append(torch.stack(vs))
        if len({n for row in lengths for n in row}) != 1:
            per = lengths[0] if len(lengths) == 1 else lengths
            what = "per kv head" if len(lengths) == 1 else "per row and kv head"
            raise ValueError(f"kvc.hf.Cache: layer {layer} keeps {per} tokens {what}; expected equal lengths "
                             "(transformers' attention takes one mask for every head and row)")
        k = torch.stack(rows_k).to(device=device, dtype=dtype)
        v = torch.stack(rows_v).to(device=device, dtype=dtype)
        if self._lw_modules is not None:  # the log-weights of these rows, for _log_weighted_attention
            lw = torch.stack([torch.stack([torch.from_numpy(self.kvc.log_weights(seq, layer, h))
                                           for h in range(self._num_kv_heads)]) for seq in self.seqs])
            self._lw_modules[layer]._kvc_log_weights = (k, lw)
        return k, v

    def _check_batch(self, layer, key_states):
        """Shapes and the batch, before anything changes; at the first forward, one kvc sequence per
        row."""
        shape = tuple(key_states.shape)
        if key_states.dim() != 4 or shape[1] != self._num_kv_heads or shape[3] != self._head_dim:
            raise ValueError(f"kvc.hf.Cache: key_states has shape {shape}, expected "
                             f"(batch, {self._num_kv_heads}, n, {self._head_dim})")
        rows = shape[0]
        if rows != len(self.seqs) and not (layer == 0 and self._fresh()):
            raise ValueError(f"kvc.hf.Cache: key_states has batch size {rows}, expected {len(self.seqs)} (the rows "
                             "this cache holds; a new batch needs reset() or a new cache, and more rows of this "
                             "one batch_repeat_interleave or batch_select_indices)")
        if layer == 0 and self.kvc.policy is not None:
            padded, self._padded = self._padded, None  # read once: the next forward's hook sets it again
            if padded:
                raise ValueError(f"kvc.hf.Cache: spec = '{self.spec}' compresses, but the batch of {rows} row(s) has "
                                 "padding (its attention_mask hides tokens), and evicted rows would no longer line "
                                 "up with the mask's columns; expected rows of equal length without padding, or a "
                                 "spec without a policy")
            if self.kvc.observes == "query_stats" and rows > 1 and self.compressing:
                raise ValueError(f"kvc.hf.Cache: spec = '{self.spec}' observes query statistics, which kvc keeps per "
                                 f"layer, not per sequence, and the batch has {rows} rows; expected batch size 1")
            if padded is None and rows > 1:
                why = ("the model's forward had an attention_mask kvc.hf cannot read (expected a 2D tensor or "
                       "None), or the model called was not the one the cache was built with"
                       if self._mask_hooked else "the cache was built from the config")
                raise ValueError(f"kvc.hf.Cache: spec = '{self.spec}' compresses a batch of {rows} rows, but {why}, "
                                 "so it cannot see whether the batch is padded; expected model_or_config to be the "
                                 "model, called with a 2D attention_mask or none")
        if rows != len(self.seqs):  # the first forward: one sequence per row
            for _ in range(rows - len(self.seqs)):
                self.seqs.append(self.kvc.add_sequence())
            for s in self.seqs[rows:]:
                self.kvc.remove_sequence(s)
            del self.seqs[rows:]

    def _fresh(self):
        """Whether no row holds or has seen a token: a forward may then bring a batch of any size."""
        return all(self.kvc.seen(s, i) == 0 for s in self.seqs for i in range(len(self.layers)))

    def _update(self, layer, key_states, value_states):
        try:
            self._check_batch(layer, key_states)
        except ValueError:
            if self._queries_before is not None and self._queries_before[0] == layer:
                self._queries[layer] = self._queries_before[1]  # the refused forward's queries are not kept
            raise
        finally:
            self._queries_before = None
        kept_before = self._kept(layer)
        if layer == 0:
            self._kept_layer0 = kept_before  # what this forward's mask was sized by
        elif kept_before != self._kept_layer0:
            raise ValueError(f"kvc.hf.Cache: layer {layer} keeps {kept_before} tokens but layer 0 kept "
                             f"{self._kept_layer0}; expected every layer to keep as many (transformers builds one "
                             "mask for all layers)")
        n = key_states.shape[2]
        # [B, H, n, D] -> [B, n, H, D], float32, C-contiguous, on the CPU: kvc's layout per row.
        k = key_states.detach().transpose(1, 2).to("cpu", torch.float32).contiguous().numpy()
        v = value_states.detach().transpose(1, 2).to("cpu", torch.float32).contiguous().numpy()
        if self.kvc.observes == "query_stats" and self.kvc.policy is not None and self.compressing:
            self.kvc.observe_queries(layer, self._forward_queries(layer, k)[0])  # after the checks: a refusal adds none
        if self.kvc.observes == "attention" and self.kvc.policy is not None and self.compressing:
            self._append_attending(layer, k, v)
        else:
            for row, seq in enumerate(self.seqs):
                self.kvc.append(seq, layer, k[row], v[row])
        phase = None
        if self.kvc.policy is not None and self.compressing:
            if self.one_shot or kept_before == 0:
                phase = self.kvc.after_prefill
            elif n == 1:
                phase = self.kvc.after_decode_step
        observe = self._storage_window > 0 and self._observes_storage(kept_before == 0)
        # MiniCache: the prompt's forward attends over the rows as appended; once its last layer
        # has them, every layer pair is merged for the next forwards.
        merge_layers = self._minicache and self.compressing and kept_before == 0 and layer == len(self.layers) - 1
        if phase is None and not observe and not merge_layers:
            return self._gather(layer, key_states.device, key_states.dtype)
        # This forward's queries attend to everything (the prompt's rows whole, for think and xkv);
        # the compression and the storage's fit serve the next forwards.
        out = self._gather(layer, key_states.device, key_states.dtype)
        if phase is not None:
            queries = self._queries[layer] if self.kvc.observes == "query_window" else None
            for row, seq in enumerate(self.seqs):
                self.reports.append(phase(seq, layer, queries=None if queries is None else queries[row]))
        if observe:  # after the policy's eviction, as kvc-llama's observe_windows
            q = self._storage_queries[layer]
            self._storage_queries[layer] = None
            if q is None or q.shape[0] != len(self.seqs):
                raise ValueError(f"kvc.hf.Cache: layer {layer} has no queries of this forward for storage "
                                 f"'{self.kvc.storage}' (it observes the prompt's last queries); expected the query "
                                 "hooks of the model the cache was built with (close() removed them?)")
            for row, seq in enumerate(self.seqs):
                self.kvc.observe_window(seq, layer, np.ascontiguousarray(q[row]))
        if merge_layers:
            for seq in self.seqs:
                self.layer_merges.append(self.kvc.cross_layer_merge(seq))
        return out

    def _forward_queries(self, layer, k):
        """This forward's queries of one layer, [B, n, Hq, D], taken from the hook (which saw them
        before the attention module ran) for the policies that read them in _update."""
        q = self._queries[layer]
        self._queries[layer] = None
        if q is None or q.shape[:2] != k.shape[:2]:
            raise ValueError(f"kvc.hf.Cache: layer {layer} has no queries of this forward (shape "
                             f"{None if q is None else q.shape[:2]}, expected {k.shape[:2]}); a policy observing "
                             f"{self.kvc.observes!r} needs the query hooks of the model it was built with (close() "
                             "removed them?)")
        return q

    def _append_attending(self, layer, k, v):
        """Policies observing attention (H2O, TOVA, Scissorhands, A2SF): each token is appended, then
        its rotated query attends over what the row keeps, which feeds the policy's observer, as
        kvc-llama's token-by-token prefill does. The output is not used: transformers attends over
        the gathered copy."""
        q = self._forward_queries(layer, k)
        scale = float(self._scaling[layer]) if self._scaling[layer] is not None else 0.0  # 0: 1/sqrt(D)
        for row, seq in enumerate(self.seqs):
            for i in range(k.shape[1]):
                self.kvc.append(seq, layer, k[row, i:i + 1], v[row, i:i + 1])
                self.kvc.attention(seq, layer, q[row, i], scale=scale)

    def reset(self):
        """Drops every row; the next forward starts a new batch of any size. A policy observing query
        statistics (kvc keeps them per layer, for every sequence) and a low-rank storage (pca's
        bases, think's channels, xkv's group bases: the cache's, fitted on the first prompt) start
        from a new kvc cache, so a new prompt is not compressed with the last one's fit."""
        if self.kvc.observes == "query_stats" or self._lowrank:  # the statistics, bases or channels: the last prompt's
            self.kvc = _kvc.Cache(self.spec, **self._kvc_args)
        else:
            for s in self.seqs:
                self.kvc.remove_sequence(s)
        self.seqs = [self.kvc.add_sequence()]
        self._queries = [None] * len(self._queries)
        self._storage_queries = [None] * len(self._queries)
        self.reports = []
        self.layer_merges = []

    # -- the batch: beam search and generate's reshaping -----------------------------------------
    def _reshape(self, rows, what):
        """The batch becomes rows (indices of the current rows, repeats allowed): a row used again is
        a fork (its pages shared, copied on write), a row not used is removed. All or nothing: the
        indices are checked and the forks made before any row is dropped."""
        rows = [int(r) for r in rows]
        bad = [r for r in rows if not 0 <= r < len(self.seqs)]
        if bad:
            raise ValueError(f"kvc.hf.Cache: {what} = {rows}, expected row indices 0..{len(self.seqs) - 1}")
        if not rows:
            raise ValueError(f"kvc.hf.Cache: {what} is empty, expected at least one row")
        used, new = set(), []
        try:
            for r in rows:
                new.append(self.seqs[r] if r not in used else self.kvc.fork(self.seqs[r]))
                used.add(r)
        except Exception:
            for r, s in zip(rows, new):
                if s != self.seqs[r]:
                    self.kvc.remove_sequence(s)
            raise
        queries = [q[rows] if q is not None and q.shape[0] == len(self.seqs) else None for q in self._queries]
        for r, s in enumerate(self.seqs):
            if r not in used:
                self.kvc.remove_sequence(s)
        self.seqs = new
        self._queries = queries

    def reorder_cache(self, beam_idx):
        """Beam search: row i continues beam beam_idx[i]."""
        self._reshape(torch.as_tensor(beam_idx).reshape(-1).tolist(), "beam_idx")

    def batch_repeat_interleave(self, repeats: int):
        """Each row repeated `repeats` times in place (generate's expansion for beams or samples)."""
        if int(repeats) < 1:
            raise ValueError(f"kvc.hf.Cache: batch_repeat_interleave(repeats={repeats}), expected >= 1")
        self._reshape([r for r in range(len(self.seqs)) for _ in range(int(repeats))], "repeats")

    def batch_select_indices(self, indices):
        """Keeps the rows `indices`, in that order."""
        self._reshape(torch.as_tensor(indices).reshape(-1).tolist(), "indices")

    @property
    def is_croppable(self) -> bool:
        """Whether ``crop`` can forget tokens: a storage that can rewind, and no policy compressing
        (transformers checks it before assisted generation's first crop)."""
        return bool(self.kvc.can_rewind) and not (self.kvc.policy is not None and self.compressing)

    def crop(self, tokens_to_remove: int):
        """Forgets the ``-tokens_to_remove`` newest tokens (transformers 5 passes a negative count, 0
        for none) of every layer and row, as ``DynamicCache.crop``: what assisted and speculative
        decoding (``generate`` with ``assistant_model`` or ``prompt_lookup_num_tokens``) call after
        a rejected draft. The kept tokens stay as stored (quantized ones stay quantized) and no page
        is allocated (``kvc.Cache.rewind``). Raises ``ValueError`` for a positive count (the legacy
        absolute length, which transformers 5 refuses too), for more tokens than were seen, while a
        policy compresses (its evictions and the attention it observed from the dropped tokens
        cannot be undone; compress the context with ``kvc.hf.press`` and generate after it, or use
        no policy) and for storages that cannot rewind (merging stages, low-rank, mixed precision);
        the cache is then unchanged."""
        count = int(tokens_to_remove)
        seen = self._seen(0)
        if count > 0:
            raise ValueError(f"kvc.hf.Cache: crop({tokens_to_remove}), expected a negative count of tokens to remove "
                             "(or 0), as transformers 5 passes it")
        if count == 0:
            return
        if -count > seen:
            raise ValueError(f"kvc.hf.Cache: crop({tokens_to_remove}) with {seen} tokens seen, expected at most "
                             f"{seen} tokens to remove")
        if self.kvc.policy is not None and self.compressing:
            raise ValueError(f"kvc.hf.Cache: crop({tokens_to_remove}) while spec = '{self.spec}' compresses: the "
                             "tokens it evicted and the attention it observed while the cropped tokens were in the "
                             "cache cannot be undone; expected kvc.hf.press(model, spec) for the context and "
                             "generation after it, or a spec without a policy")
        if not self.kvc.can_rewind:
            raise ValueError(f"kvc.hf.Cache: crop({tokens_to_remove}): storage '{self.kvc.storage}'"
                             f"{' with merging stage ' + repr(self.kvc.merging) if self.kvc.merging else ''} cannot "
                             "forget tokens (a merged token may hold members from the cropped positions; low-rank "
                             "and mixed-precision stores cannot rewind); expected a plain or quantized storage")
        self.kvc.rewind(self.seqs, seen + count)

    # -- reading ---------------------------------------------------------------------------------
    def kept_positions(self, row: int = 0):
        """The original positions each (layer, kv head) stream of one row of the batch keeps: a list
        of lists of int lists."""
        if not 0 <= row < len(self.seqs):
            raise ValueError(f"kvc.hf.Cache: row = {row}, expected 0..{len(self.seqs) - 1}")
        return [[self.kvc.positions(self.seqs[row], layer, h).tolist() for h in range(self._num_kv_heads)]
                for layer in range(len(self.layers))]

    def bytes_in_use(self) -> int:
        """Page-pool bytes kvc holds for this cache."""
        return self.kvc.bytes_in_use()

    def __repr__(self):
        return (f"kvc.hf.Cache('{self.kvc.spec}', layers={len(self.layers)}, rows={len(self.seqs)}, "
                f"seen={self._seen(0)}, kept={self._kept(0)})")


def _storage_name(spec):
    """The storage stage's name of a spec (its last stage; fp32 when the spec has none)."""
    last = spec.split("+")[-1].strip() if spec.strip() else "fp32"
    return last.split("(")[0].strip()


def _forward_cache(kwargs):
    """The cache a forward was given (transformers 5.25 names it ``cache``, earlier ``past_key_values``)."""
    return kwargs["cache"] if "cache" in kwargs else kwargs.get("past_key_values")


def _mask_hook(cache_ref):
    """A pre-hook on the model: whether its forward's attention_mask (2D, [batch, tokens]; what
    generate and callers pass) hides a token of some row. None when the mask is of another form.
    The check comes before any attention backend turns the mask into its own (a 4D tensor, a
    BlockMask, or nothing for flash attention), so it reads the same for every backend."""
    def hook(module, args, kwargs):
        cache = cache_ref()
        if cache is None or _forward_cache(kwargs) is not cache:
            return None
        mask = kwargs.get("attention_mask")
        if mask is None:
            cache._padded = False
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2:
            cache._padded = bool((mask == 0).any())
        else:
            cache._padded = None
        return None
    return hook


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
