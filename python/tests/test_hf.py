# SPDX-License-Identifier: Apache-2.0
"""kvc.hf on SmolLM2-135M-Instruct loaded by transformers from the project's GGUF, against
independent references: transformers' own DynamicCache (logits and generated ids), attention
restricted by a per-(layer, head) mask to the positions kvc kept, over an uncompressed
DynamicCache (the question's logits after a one-shot compression), and the C++ engine kvc-llama
(the positions SnapKV keeps for the same token ids).

Skipped, saying why, without torch / transformers / gguf / accelerate, without the model
(scripts/fetch-model; KVC_MODEL names another file) and, for the C++ comparison, without the
kvc-llama binary (KVC_LLAMA names it; scripts/test sets it after building the engine)."""
import gc
import json
import os
import pathlib
import subprocess

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="kvc.hf needs torch (pip install torch)")
transformers = pytest.importorskip("transformers", reason="kvc.hf needs transformers (pip install transformers)")
pytest.importorskip("gguf", reason="loading the GGUF model in transformers needs gguf (pip install gguf)")
pytest.importorskip("accelerate", reason="loading a GGUF model in transformers needs accelerate")

import kvc  # noqa: E402
import kvc.hf  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = pathlib.Path(os.environ.get("KVC_MODEL") or ROOT / ".cache/model/SmolLM2-135M-Instruct.Q4_1.gguf")
TOL = 1e-4  # max |logit difference| allowed against DynamicCache

pytestmark = pytest.mark.skipif(not MODEL.is_file(),
                                reason=f"model {MODEL} not found: run scripts/fetch-model (or set KVC_MODEL)")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_pretrained(str(MODEL.parent), gguf_file=MODEL.name,
                                                          dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module")
def tokens(model):
    """A natural-text prompt of 240 token ids (the repository's README), same ids for every engine."""
    tok = transformers.AutoTokenizer.from_pretrained(str(MODEL.parent), gguf_file=MODEL.name)
    ids = tok((ROOT / "README.md").read_text()[:4000], return_tensors="pt").input_ids[:, :240]
    assert ids.shape[1] == 240
    return ids


def batch_step_logits(model, ids, cache, steps, mask=None):
    """Each row's last logits, then those of `steps` greedy tokens per row fed one at a time: [steps+1, B, V]."""
    out, x = [], ids
    with torch.no_grad():
        for _ in range(steps + 1):
            kw = {} if mask is None else {"attention_mask": mask}
            logits = model(x, cache=cache, use_cache=True, **kw).logits[:, -1]
            out.append(logits)
            x = logits.argmax(-1, keepdim=True)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(x)], 1)
    return torch.stack(out)


def step_logits(model, ids, cache, steps):
    """Logits of the prompt's last token, then of `steps` greedy tokens fed one at a time (one row)."""
    return batch_step_logits(model, ids, cache, steps)[:, 0]


def test_import_kvc_does_not_import_torch():
    code = "import sys, kvc; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    r = subprocess.run([__import__("sys").executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_fp32_logits_equal_dynamic_cache(model, tokens):
    ids = tokens[:, :64]
    ref = step_logits(model, ids, transformers.DynamicCache(config=model.config), steps=8)
    cache = kvc.hf.Cache("fp32", model.config)
    got = step_logits(model, ids, cache, steps=8)
    diff = (ref - got).abs().max().item()
    print(f"fp32 kvc.hf.Cache vs DynamicCache: max |logit diff| = {diff:.3g} over {len(ref)} positions")
    assert diff <= TOL
    assert cache.get_seq_length() == 64 + 8 and cache.kvc.tokens_held == 30 * 3 * (64 + 8)


def test_lossy_storage_is_what_attention_reads(model, tokens):
    # The K/V attention reads come from kvc: a 2-bit storage moves the logits away from DynamicCache's.
    ids = tokens[:, :64]
    ref = step_logits(model, ids, transformers.DynamicCache(config=model.config), steps=2)
    got = step_logits(model, ids, kvc.hf.Cache("int2", model.config), steps=2)
    assert (ref - got).abs().max().item() > 100 * TOL


def test_generate_fp32_same_ids_as_dynamic_cache(model, tokens):
    ids = tokens[:, :48]
    ref = model.generate(ids, max_new_tokens=10, do_sample=False)
    got = model.generate(ids, max_new_tokens=10, do_sample=False, cache=kvc.hf.Cache("fp32", model.config))
    assert got.tolist() == ref.tolist()


def test_log_weighted_merging_attends_with_the_log_weights(model, tokens):
    """d2o (mass=1) inside transformers: after the prompt is merged, each layer's decode attention
    (kvc's attention implementation, the log-weights on the logits) equals kvc's own merged kernel
    over the same rows, and differs from a softmax without them; the model gets its attention
    implementation back when the last of two such caches is collected (not at close(): press
    closes a cache that generate then uses)."""
    before = model.config._attn_implementation
    cache = kvc.hf.Cache("knorm(tokens=40,sinks=0,interval=1000,slack=1000)+d2o", model)  # decode keeps the rows
    other = kvc.hf.Cache("knorm(tokens=40,sinks=0)+kvmerger", model)
    assert model.config._attn_implementation == "kvc_log_weighted"
    modules = {m.layer_idx: m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")}
    seen, hooks = {}, []
    for i, m in modules.items():
        def pre(module, args, kwargs, i=i):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
            q = module.q_proj(hidden).view(hidden.shape[0], hidden.shape[1], -1, module.head_dim)
            half = q.shape[-1] // 2
            rotated = q * cos.unsqueeze(2) + torch.cat((-q[..., half:], q[..., :half]), -1) * sin.unsqueeze(2)
            seen[i] = {"q": rotated[0, -1].detach().numpy()}
        def out(module, args, i=i):
            seen[i]["attn"] = args[0][0, -1].detach().numpy()
        hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(m.o_proj.register_forward_pre_hook(out))
    try:
        with torch.no_grad():
            model(tokens[:, :120], cache=cache)
            model(tokens[:, 120:121], cache=cache)
        check_log_weighted_step(cache, modules, seen)
        cache.close()
        other.close()
        assert model.config._attn_implementation == "kvc_log_weighted"  # closed caches may still generate
        del cache
        gc.collect()
        assert model.config._attn_implementation == "kvc_log_weighted"  # the other cache still holds it
        del other
        gc.collect()
        assert model.config._attn_implementation == before
    finally:
        for h in hooks:
            h.remove()
        if model.config._attn_implementation != before:  # a failure above: the next tests get the model as it was
            model.set_attn_implementation(before)
            model._kvc_log_weighted_users = 0


def check_log_weighted_step(cache, modules, seen):
    """The decode step of test_log_weighted_merging_attends_with_the_log_weights, layer by layer."""
    assert cache.reports[0].tokens_after == 40 * cache.kvc.num_kv_heads
    assert cache.kvc.length(cache.seq, 29, 0) == 41  # the step's token appended, nothing merged since
    apart = 0.0
    for layer in (0, 9, 29):
        m = modules[layer]
        lw = [cache.kvc.log_weights(cache.seq, layer, h) for h in range(cache.kvc.num_kv_heads)]
        assert max(w.max() for w in lw) > 0.5, "nothing merged: the log-weights would test nothing"
        q, got = seen[layer]["q"], seen[layer]["attn"].reshape(-1, m.head_dim)
        ref = cache.kvc.attention(cache.seq, layer, np.ascontiguousarray(q, np.float32), scale=float(m.scaling))
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4, err_msg=f"layer {layer}")
        group = q.shape[0] // len(lw)
        for qh in range(q.shape[0]):  # the same softmax without the log-weights
            k, v = cache.kvc.gather(cache.seq, layer, qh // group)
            s = k.astype(np.float64) @ q[qh].astype(np.float64) * float(m.scaling)
            p = np.exp(s - s.max())
            apart = max(apart, np.abs((p / p.sum()) @ v - got[qh]).max())
    assert apart > 1e-3


def test_minicache_merges_after_the_prompt_and_attends_over_the_merged_rows(model, tokens):
    """minicache through transformers: the layer pairs are merged once the prompt is in every layer,
    and the next step's logits equal those over fp32 pages holding exactly the rows kvc holds after
    the merge, to the rounding of the step's own token (fp16 in kvc, fp32 in the reference), which
    a control without merges measures."""
    # gamma=0.5: at the paper's 0.05 a handful of tokens per stream would merge on this model, too
    # few to free a page, so kvc's page rule (kvc/merge/minicache.hpp) merges none of them.
    cache = kvc.hf.Cache("minicache(gamma=0.5)", model)
    control = kvc.hf.Cache("fp16", model.config)
    with torch.no_grad():
        model(tokens[:, :100], cache=cache)
        model(tokens[:, :100], cache=control)
    assert len(cache.layer_merges) == 1 and cache.layer_merges[0].merged > 0 and cache.layer_merges[0].retained > 0
    # Bytes: the merged pairs hold fewer pages than the same tokens in plain fp16 pages.
    assert cache.kvc.bytes_in_use() < control.kvc.bytes_in_use()

    def rows_in_fp32(c):
        plain = kvc.hf.Cache("fp32", model.config)
        for layer in range(c.kvc.num_layers):
            rows = [c.kvc.gather(c.seq, layer, h) for h in range(c.kvc.num_kv_heads)]
            plain.kvc.append(plain.seq, layer, np.stack([r[0] for r in rows], 1), np.stack([r[1] for r in rows], 1))
        return plain

    plain, control_plain = rows_in_fp32(cache), rows_in_fp32(control)
    with torch.no_grad():
        step = tokens[:, 100:101]
        err = (model(step, cache=cache).logits[0, -1] - model(step, cache=plain).logits[0, -1]).abs().max().item()
        bound = (model(step, cache=control).logits[0, -1] - model(step, cache=control_plain).logits[0, -1]).abs().max().item()
    print(f"minicache(gamma=0.5) against fp32 pages of its rows: {err:.2e}; fp16 against its rows: {bound:.2e}")
    assert 0 < bound < 1e-2
    assert err <= 2 * bound + 1e-4
    assert len(cache.layer_merges) == 1  # the decode step merged nothing more
    cache.close()


def test_generate_with_policy_compresses_and_continues(model, tokens):
    ids = tokens[:, :128]
    cache = kvc.hf.Cache("snapkv(ratio=0.5)+kivi(bits=2)", model)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, cache=cache)
    assert out.shape[1] == 128 + 6
    # seen counts every token fed (the last generated one is not fed back); the prompt kept half.
    assert cache.get_seq_length() == 128 + 5
    assert cache.reports[0].tokens_before == 128 * 3 and cache.reports[0].tokens_after == 64 * 3
    kept = cache.kept_positions()
    assert all(len(p) == len(kept[0][0]) < 128 + 5 for layer in kept for p in layer)
    cache.close()


def masked_reference(model, context, question, kept):
    """Question logits with an uncompressed DynamicCache of the context, each (layer, query head)
    attending only to the context positions its kv head kept (bool mask per layer, through a
    pre-hook on the attention modules), and at the true positions."""
    S, q = context.shape[1], question.shape[1]
    cfg = model.config
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    ref = transformers.DynamicCache(config=cfg)
    with torch.no_grad():
        model(context, cache=ref)
    masks = []
    for layer in kept:
        m = torch.zeros(1, cfg.num_attention_heads, q, S + q, dtype=torch.bool)
        for hq in range(cfg.num_attention_heads):
            m[0, hq, :, torch.tensor(layer[hq // group], dtype=torch.long)] = True
        m[0, :, :, S:] = torch.tril(torch.ones(q, q, dtype=torch.bool))
        masks.append(m)
    hooks = []
    for module in model.modules():
        if hasattr(module, "q_proj") and hasattr(module, "layer_idx"):
            def hook(mod, args, kwargs, _m=masks[module.layer_idx]):
                kwargs["attention_mask"] = _m
                return args, kwargs
            hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            pos = torch.arange(S, S + q).unsqueeze(0)
            return model(question, cache=ref, position_ids=pos).logits[0]
    finally:
        for h in hooks:
            h.remove()


def test_press_question_logits_equal_masked_reference(model, tokens):
    context, question = tokens[:, :160], tokens[:, 160:176]
    with kvc.hf.press(model, "snapkv(ratio=0.5)") as cache:
        with torch.no_grad():
            model(context, cache=cache)
    assert cache.get_seq_length() == 160 and cache.kvc.length(cache.seq, 0, 0) == 80
    assert not cache._hooks, "press removes its query hooks when the block ends"
    kept = cache.kept_positions()
    with torch.no_grad():
        got = model(question, cache=cache).logits[0]
    ref = masked_reference(model, context, question, kept)
    diff = (ref - got).abs().max().item()
    print(f"press snapkv(ratio=0.5): question logits vs masked DynamicCache: max |diff| = {diff:.3g}")
    assert diff <= TOL
    # The question is kept whole: compression happened once, for the context only.
    assert cache.get_seq_length() == 176 and cache.kvc.length(cache.seq, 0, 0) == 80 + 16
    assert len(cache.reports) == 30


def test_snapkv_int4_holds_a_tenth_of_dynamic_cache_bytes(model):
    """Issue 14's memory target at 512 tokens (python/bench/bench_hf_memory.py measures 2,048): a
    generate() with snapkv(ratio=0.75)+int4 holds <= 1/10 of the KV bytes of an fp32 DynamicCache.
    DynamicCache's bytes are its tensors' nbytes (checked against L * 2 * H * n * D * 4); kvc's are
    its page pool's bytes_in_use."""
    tok = transformers.AutoTokenizer.from_pretrained(str(MODEL.parent), gguf_file=MODEL.name)
    prompt, new = 480, 33  # the last generated token is not fed back: the caches see 480 + 32 = 512
    ids = tok((ROOT / "README.md").read_text(), return_tensors="pt").input_ids[:, :prompt]
    assert ids.shape[1] == prompt
    cfg = model.config
    run = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    dyn = transformers.DynamicCache(config=cfg)
    with torch.no_grad():
        model.generate(ids, cache=dyn, **run)
    dyn_bytes = sum(t.nbytes for layer in dyn.layers for t in (layer.keys, layer.values))
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert dyn.layers[0].keys.dtype == torch.float32
    assert dyn_bytes == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * 512 * head_dim * 4
    cache = kvc.hf.Cache("snapkv(ratio=0.75)+int4", model)
    with torch.no_grad():
        model.generate(ids, cache=cache, **run)
    cache.close()
    assert cache.get_seq_length() == 512 and cache._kept(0) < 512 // 2
    pool = cache.bytes_in_use()
    print(f"512 tokens: kvc pool {pool} B (+ {cache.kvc.metadata_bytes} B metadata), DynamicCache fp32 "
          f"{dyn_bytes} B: ratio {pool / dyn_bytes:.4f}, {cache._kept(0)} tokens kept per layer")
    assert 0 < pool <= dyn_bytes / 10


def test_query_window_holds_only_the_window(model, tokens):
    """After a prompt the hooks keep the last `window` queries of each layer in arrays of their own,
    not views of the whole prompt's queries (which would hold them all); press drops them."""
    ids = tokens[:, :128]
    cache = kvc.hf.Cache("snapkv(ratio=0.5,window=16)", model)
    with torch.no_grad():
        model(ids, cache=cache)
    cache.close()
    assert all(q.shape[:2] == (1, 16) and q.base is None for q in cache._queries)
    with kvc.hf.press(model, "snapkv(ratio=0.5,window=16)") as pressed:
        with torch.no_grad():
            model(ids, cache=pressed)
    assert all(q is None for q in pressed._queries)


def test_errors_name_the_argument(model):
    with pytest.raises(ValueError, match="model_or_config must be the model"):
        kvc.hf.Cache("snapkv(ratio=0.5)", model.config)
    with pytest.raises(ValueError, match="the policy observes query stats, so model_or_config must be the model"):
        kvc.hf.Cache("expected_attention(ratio=0.5)", model.config)
    ea = kvc.hf.Cache("expected_attention(ratio=0.5)", model)  # statistics per layer: one row only
    with pytest.raises(ValueError, match="kvc keeps per layer, not per sequence, and the batch has 2 rows"):
        with torch.no_grad():
            model(torch.zeros(2, 4, dtype=torch.long), cache=ea)
    assert ea.kvc.tokens_held == 0
    ea.close()
    with pytest.raises(ValueError, match="the policy observes attention, so model_or_config must be the model"):
        kvc.hf.Cache("h2o(ratio=0.5)", model.config)
    with pytest.raises(ValueError, match=r"merging stage 'd2o' gives merged tokens log-weights .* so model_or_config "
                                         r"must be the model \(not its config\); or a merging stage without mass"):
        kvc.hf.Cache("snapkv(ratio=0.5)+d2o", model.config)
    with pytest.raises(ValueError, match=r"policy 'cake' gives each layer a budget of its own, but transformers takes "
                                         r"one attention mask for every layer"):
        kvc.hf.Cache("cake(ratio=0.5)", model)
    with pytest.raises(ValueError, match="model_or_config is a str"):
        kvc.hf.Cache("fp32", "SmolLM2")
    cache = kvc.hf.Cache("fp32", model.config)
    # A layer keeping more than layer 0 would not fit the one mask transformers builds.
    cache.kvc.append(cache.seq, 1, np.zeros((1, 3, 64), np.float32), np.zeros((1, 3, 64), np.float32))
    cache.update(torch.zeros(1, 3, 4, 64), torch.zeros(1, 3, 4, 64), 0)
    with pytest.raises(ValueError, match="layer 1 keeps 1 tokens but layer 0 kept 0; expected every layer"):
        cache.update(torch.zeros(1, 3, 4, 64), torch.zeros(1, 3, 4, 64), 1)
    with pytest.raises(ValueError, match=r"key_states has batch size 2, expected 1 \(the rows this cache holds"):
        cache.update(torch.zeros(2, 3, 4, 64), torch.zeros(2, 3, 4, 64), 0)
    with pytest.raises(ValueError, match=r"key_states has shape \(1, 2, 4, 64\), expected \(batch, 3, n, 64\)"):
        cache.update(torch.zeros(1, 2, 4, 64), torch.zeros(1, 2, 4, 64), 0)


KVC_LLAMA = os.environ.get("KVC_LLAMA")
SPECS = ["snapkv(ratio=0.5)", "snapkv(ratio=0.75,window=16)", "knorm(ratio=0.5)", "h2o(ratio=0.5)", "tova(ratio=0.5)",
         "expected_attention(ratio=0.5)",
         # merging stages (their kept positions do not depend on log-weights): H2O fed by the merged kernel's probabilities
         "h2o(ratio=0.5)+cam", "snapkv(ratio=0.5)+d2o(mass=0)"]


@pytest.mark.skipif(not (KVC_LLAMA and os.access(KVC_LLAMA, os.X_OK)),
                    reason="the C++ engine is not built: set KVC_LLAMA to a kvc-llama binary")
@pytest.mark.parametrize("spec", SPECS)
def test_cpp_engine_keeps_the_same_positions(model, tokens, spec, tmp_path):
    ids_file, dump = tmp_path / "ids.txt", tmp_path / "kept.json"
    ids_file.write_text(" ".join(map(str, tokens[0].tolist())))
    subprocess.run([KVC_LLAMA, "--model", str(MODEL), "--prompt-ids", str(ids_file), "-n", "0", "--cache", spec,
                    "--dump-kept", str(dump)], check=True, capture_output=True, timeout=300)
    ref = json.loads(dump.read_text())
    assert ref["prompt_tokens"] == tokens.shape[1]
    with kvc.hf.press(model, spec) as cache:
        with torch.no_grad():
            model(tokens, cache=cache)
    got = cache.kept_positions()
    assert len(got) == len(ref["positions"]) and len(got[0]) == len(ref["positions"][0])
    streams = same = shared = total = 0
    for ref_layer, got_layer in zip(ref["positions"], got):
        for a, b in zip(ref_layer, got_layer):
            assert len(a) == len(b)
            streams += 1
            same += a == b
            shared += len(set(a) & set(b))
            total += len(a)
    print(f"{spec}: {same}/{streams} streams identical, {shared}/{total} = {shared / total:.4f} positions shared "
          "with kvc-llama")
    # The engines differ in fp32 rounding (Eigen over dequantized Q4_1 vs torch): a score tie at the
    # budget's edge may flip one position, never more than 1% of them.
    assert shared / total >= 0.99
    assert same / streams >= 0.9


# -- batches and beam search (batch_step_logits above) ------------------------------------------

def test_batch_fp32_logits_equal_dynamic_cache(model, tokens):
    ids = torch.cat([tokens[:, :48], tokens[:, 100:148]])
    ref = batch_step_logits(model, ids, transformers.DynamicCache(config=model.config), steps=6)
    cache = kvc.hf.Cache("fp32", model.config)
    got = batch_step_logits(model, ids, cache, steps=6)
    diff = (ref - got).abs().max().item()
    print(f"fp32, batch of 2: max |logit diff| against DynamicCache = {diff:.3g}")
    assert diff <= TOL
    assert len(cache.seqs) == 2 and cache.kvc.tokens_held == 2 * 30 * 3 * (48 + 6)


def test_padded_batch_generate_equals_dynamic_cache(model, tokens):
    # Left padding (generate's convention for decoder-only models): row 0 is 20 tokens shorter.
    ids = torch.cat([tokens[:, :48], tokens[:, 100:148]])
    mask = torch.ones_like(ids)
    ids[0, :20], mask[0, :20] = 0, 0
    run = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **run)
    got = model.generate(ids, cache=kvc.hf.Cache("fp32", model.config), **run)
    assert got.tolist() == ref.tolist()
    # and the logits of every step, the padded row's included
    ref_l = batch_step_logits(model, ids, transformers.DynamicCache(config=model.config), 3, mask)
    got_l = batch_step_logits(model, ids, kvc.hf.Cache("fp32", model.config), 3, mask)
    diff = (ref_l - got_l).abs().max().item()
    print(f"fp32, left-padded batch of 2: max |logit diff| against DynamicCache = {diff:.3g}")
    assert diff <= TOL


@pytest.mark.parametrize("spec", ["snapkv(ratio=0.5,window=16)", "h2o(ratio=0.5)"])
def test_batch_rows_compress_as_they_would_alone(model, tokens, spec):
    """A batch of two prompts under a policy observing the query window (snapkv) or the attention
    of every token (h2o): each row keeps the positions, and gets the logits, that its prompt gets
    in a batch of one, through the prompt and 3 decode steps."""
    prompts = [tokens[:, :96], tokens[:, 120:216]]
    cache = kvc.hf.Cache(spec, model)
    got = batch_step_logits(model, torch.cat(prompts), cache, steps=3)
    cache.close()
    assert cache.get_seq_length() == 96 + 3 and cache._kept(0) < 96 // 2 + 3  # compressed at every step
    for row, ids in enumerate(prompts):
        alone = kvc.hf.Cache(spec, model)
        ref = batch_step_logits(model, ids, alone, steps=3)
        alone.close()
        assert cache.kept_positions(row) == alone.kept_positions()
        diff = (ref[:, 0] - got[:, row]).abs().max().item()
        print(f"{spec}, row {row} of a batch of 2 against alone: max |logit diff| = {diff:.3g}")
        assert diff <= TOL
    with pytest.raises(ValueError, match=r"row = 2, expected 0..1"):
        cache.kept_positions(2)


def test_batch_errors_leave_the_cache_unchanged(model, tokens):
    ids = torch.cat([tokens[:, :32], tokens[:, 40:72]])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    cache = kvc.hf.Cache("snapkv(ratio=0.5,window=8)", model)
    impl = model.config._attn_implementation
    try:
        for backend in ("sdpa", "eager"):  # the padding is read before the backend builds its mask
            model.set_attn_implementation(backend)
            with pytest.raises(ValueError, match=r"the batch of 2 row\(s\) has padding"):
                with torch.no_grad():
                    model(ids, cache=cache, attention_mask=mask)
            with pytest.raises(ValueError, match=r"the batch of 1 row\(s\) has padding"):  # one padded row too
                with torch.no_grad():
                    model(ids[1:], cache=cache, attention_mask=mask[1:])
    finally:
        model.set_attn_implementation(impl)
    # Nothing changed: no token, no extra sequence, and the refused forwards' queries are not kept.
    assert len(cache.seqs) == 1 and cache.kvc.tokens_held == 0 and cache.kvc.seen(cache.seq, 0) == 0
    assert all(q is None for q in cache._queries)
    other = kvc.hf.Cache("fp32", model.config)  # another cache's forwards do not reach this one's hooks
    with torch.no_grad():
        model(ids, cache=other, attention_mask=mask)
    assert all(q is None for q in cache._queries) and cache._padded is None
    with torch.no_grad():  # the same batch without padding goes through
        model(ids, cache=cache)
    assert len(cache.seqs) == 2 and cache._queries[0].shape[:2] == (2, 8) and cache._kept(0) == 16
    cache.close()
    by_config = kvc.hf.Cache("knorm(ratio=0.5)", model.config)
    with pytest.raises(ValueError, match="the cache was built from the config, so it cannot see whether the batch"):
        with torch.no_grad():
            model(ids, cache=by_config)
    assert by_config.kvc.tokens_held == 0
    # Reshaping: bad indices change nothing.
    fp = kvc.hf.Cache("fp32", model.config)
    with torch.no_grad():
        model(ids, cache=fp)
    before = (list(fp.seqs), fp.kvc.tokens_held, fp.bytes_in_use())
    with pytest.raises(ValueError, match=r"beam_idx = \[0, 2\], expected row indices 0..1"):
        fp.reorder_cache(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"repeats=0\), expected >= 1"):
        fp.batch_repeat_interleave(0)
    with pytest.raises(ValueError, match="on one layer; expected it on the cache"):
        fp.layers[0].reorder_cache(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"batch size 1, expected 2 \(the rows this cache holds"):
        with torch.no_grad():
            model(ids[:1, :4], cache=fp)
    assert (list(fp.seqs), fp.kvc.tokens_held, fp.bytes_in_use()) == before


@pytest.mark.parametrize("spec", ["h2o(ratio=0.5)", "expected_attention(ratio=0.5)"])
def test_observing_policies_press_and_reset(model, tokens, spec):
    """Policies observing attention (h2o) or query statistics (expected attention): press compresses
    the context to half and keeps no queries; after reset() the same prompt keeps the positions a
    fresh cache keeps (expected attention's per-layer statistics start over)."""
    ids, other = tokens[:, :96], tokens[:, 120:216]
    with kvc.hf.press(model, spec) as pressed:
        with torch.no_grad():
            model(ids, cache=pressed)
    assert pressed._kept(0) == 48 and all(q is None for q in pressed._queries)
    kept = pressed.kept_positions()
    with torch.no_grad():
        model(tokens[:, 96:104], cache=pressed)  # after the block: appended whole, no query computed
    assert pressed._kept(0) == 48 + 8 and all(q is None for q in pressed._queries)
    cache = kvc.hf.Cache(spec, model)
    with torch.no_grad():
        model(ids, cache=cache)
        assert cache.kept_positions() == kept and cache._kept(0) == 48
        cache.reset()
        model(other, cache=cache)
        cache.reset()
        model(ids, cache=cache)
    cache.close()
    assert cache.kept_positions() == kept


def test_reshaping_moves_rows_and_shares_pages(model, tokens):
    """reorder_cache, batch_repeat_interleave and batch_select_indices move kvc sequences: row i
    reads what its source row held, and a repeated row is a fork (pages shared until written)."""
    a, b = tokens[:, :64], tokens[:, 100:164]
    cache = kvc.hf.Cache("int8", model.config)
    with torch.no_grad():
        model(torch.cat([a, b]), cache=cache)
    two = cache.bytes_in_use()
    k, _ = cache._gather(5, "cpu", torch.float32)
    assert not torch.equal(k[0], k[1])
    cache.batch_repeat_interleave(2)                  # rows a, a, b, b
    assert len(cache.seqs) == 4 and cache.bytes_in_use() == two and cache.kvc.tokens_held == 4 * 30 * 3 * 64
    k4, _ = cache._gather(5, "cpu", torch.float32)
    assert [torch.equal(k4[r], k[src]) for r, src in enumerate([0, 0, 1, 1])] == [True] * 4
    cache.reorder_cache(torch.tensor([3, 0, 1, 2]))   # rows b, a, a, b
    k4, _ = cache._gather(5, "cpu", torch.float32)
    assert [torch.equal(k4[r], k[src]) for r, src in enumerate([1, 0, 0, 1])] == [True] * 4
    cache.batch_select_indices(torch.tensor([1]))     # row a
    assert len(cache.seqs) == 1 and cache.kvc.tokens_held == 30 * 3 * 64 and cache.bytes_in_use() == two // 2
    with torch.no_grad():  # it continues as a alone does
        got = model(tokens[:, 64:65], cache=cache).logits[0, -1]
        alone = kvc.hf.Cache("int8", model.config)
        model(a, cache=alone)
        ref = model(tokens[:, 64:65], cache=alone).logits[0, -1]
    assert (got - ref).abs().max().item() <= TOL


def test_beam_search_same_ids_as_dynamic_cache(model, tokens):
    ids = tokens[:, :40]
    run = dict(max_new_tokens=8, do_sample=False, num_beams=3, num_return_sequences=2)
    ref = model.generate(ids, **run)
    got = model.generate(ids, cache=kvc.hf.Cache("fp32", model.config), **run)
    assert got.tolist() == ref.tolist()
    cache = kvc.hf.Cache("snapkv(ratio=0.5)+int4", model)  # beams under compression run and keep half
    out = model.generate(ids, cache=cache, **run)
    cache.close()
    assert out.shape == (2, 40 + 8) and len(cache.seqs) == 3 and cache._kept(0) < 40


def draft_model(model):
    """A 2-layer Llama with random weights over the model's vocabulary: most of its drafts are
    rejected, so assisted generation crops the cache at most steps."""
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=model.config.vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=2048, bos_token_id=model.config.bos_token_id,
                                   eos_token_id=model.config.eos_token_id, pad_token_id=model.config.pad_token_id)
    return transformers.LlamaForCausalLM(cfg).eval()


def count_crops(cache):
    """Records every crop of `cache` in cache.crops: (tokens seen before it, its argument, seen after)."""
    cache.crops, inner = [], cache.crop

    def crop(tokens_to_remove):
        before = cache.get_seq_length()
        inner(tokens_to_remove)
        cache.crops.append((before, tokens_to_remove, cache.get_seq_length()))
    cache.crop = crop
    return cache


def test_assisted_generate_crops_and_gives_dynamic_cache_ids(model, tokens):
    ids = tokens[:, :48]
    run = dict(max_new_tokens=12, do_sample=False, assistant_model=draft_model(model))
    ref = model.generate(ids, **run)
    cache = count_crops(kvc.hf.Cache("fp32", model.config))
    got = model.generate(ids, cache=cache, **run)
    assert got.tolist() == ref.tolist()
    assert any(after < before for before, _, after in cache.crops), cache.crops  # drafts were rejected
    # Every layer and kv head holds positions 0..seen-1 after the last crop: nothing else was dropped.
    kept = cache.kept_positions()
    assert all(p == list(range(cache.get_seq_length())) for layer in kept for p in layer)


def test_assisted_generate_quantized_and_refused_under_a_policy(model, tokens):
    """A quantized storage crops like fp32 (every position kept, drafts rejected); a policy that
    compresses makes the cache not croppable, which transformers reports before the first crop.
    (transformers 5.25's assisted decoding feeds a pre-filled cache the whole prompt again: a
    DynamicCache given 48 of 64 prompt tokens holds 114 after 3 new ones, so press + assisted
    generation is not a combination to test.)"""
    ids = tokens[:, :48]
    run = dict(max_new_tokens=8, do_sample=False, assistant_model=draft_model(model))
    cache = count_crops(kvc.hf.Cache("kivi(bits=4)", model.config))
    out = model.generate(ids, cache=cache, **run)
    assert out.shape[1] == 48 + 8
    assert any(after < before for before, _, after in cache.crops), cache.crops
    kept = cache.kept_positions()
    assert all(p == list(range(cache.get_seq_length())) for layer in kept for p in layer)
    policy = kvc.hf.Cache("snapkv(ratio=0.5)+fp32", model)
    with pytest.raises(ValueError, match="can be cropped"):
        model.generate(ids, cache=policy, **run)
    policy.close()


def test_crop_refuses_what_it_cannot_undo(model, tokens):
    ids = tokens[:, :32]
    cache = kvc.hf.Cache("snapkv(ratio=0.5)+fp32", model)  # compresses after every forward
    model(ids, cache=cache)
    seen, kept = cache.get_seq_length(), cache.kept_positions()
    assert not cache.is_croppable
    with pytest.raises(ValueError, match=r"crop\(-2\) while spec = 'snapkv\(ratio=0.5\)\+fp32' compresses"):
        cache.crop(-2)
    cache.close()
    with kvc.hf.press(model, "snapkv(ratio=0.5)+cam+fp32") as merged:
        model(ids, cache=merged)
    assert not merged.is_croppable
    with pytest.raises(ValueError, match="merging stage 'cam' cannot forget tokens"):
        merged.crop(-2)
    plain = kvc.hf.Cache("fp16", model.config)
    model(ids, cache=plain)
    assert plain.is_croppable and plain.layers[3].is_croppable
    with pytest.raises(ValueError, match=r"crop\(-33\) with 32 tokens seen, expected at most 32"):
        plain.crop(-33)
    with pytest.raises(ValueError, match=r"crop\(30\), expected a negative count"):
        plain.crop(30)
    plain.crop(0)
    assert plain.get_seq_length() == 32
    plain.crop(-2)
    assert plain.get_seq_length() == 30 and plain.kept_positions()[0][0] == list(range(30))
    assert cache.get_seq_length() == seen and cache.kept_positions() == kept
    with pytest.raises(ValueError, match="on one layer; expected it on the cache"):
        plain.layers[0].crop(-1)


# -- low-rank storages ---------------------------------------------------------------------------

def test_lowrank_full_rank_pca_logits_equal_dynamic_cache(model, tokens):
    # pca fits its bases on the prompt's forward; at rank = head_dim with fp32 coefficients the
    # rebuilt rows are the rows (U Uᵀ = I up to float32 round-off), so the logits are DynamicCache's.
    ids = tokens[:, :80]
    ref = step_logits(model, ids, transformers.DynamicCache(config=model.config), steps=4)
    got = step_logits(model, ids, kvc.hf.Cache("pca(rank=64,coef=fp32)", model.config), steps=4)
    assert (ref - got).abs().max().item() <= 20 * TOL
    # And a low rank is what attention reads: the logits move.
    low = step_logits(model, ids, kvc.hf.Cache("pca(rank=8)", model.config), steps=1)
    assert (ref[:2] - low).abs().max().item() > 100 * TOL


def test_lowrank_think_prunes_on_the_prompts_last_queries(model, tokens):
    """ThinK through kvc.hf: the prompt's forward attends whole (its logits are DynamicCache's);
    then each layer's keys keep the channels numpy's ‖Q[:, d]‖·‖K[:, d]‖ ranks highest, Q being
    the prompt's last 32 rotated queries, taken here by a hook of the test's own (transformers'
    apply_rotary_pos_emb) and K DynamicCache's keys."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    ids = tokens[:, :96]
    cfg = model.config
    hq, hk, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    captured = {}

    def capture(layer):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
            with torch.no_grad():
                q = module.q_proj(hidden).view(1, hidden.shape[1], hq, d).transpose(1, 2)
                q, _ = apply_rotary_pos_emb(q, q, cos, sin)
            captured.setdefault(layer, q[0].transpose(0, 1).double().numpy())  # [n, Hq, D], the prompt's
        return hook

    layers = [0, 7, 29]
    mods = kvc.hf._attention_modules(model)
    handles = [mods[i].register_forward_pre_hook(capture(i), with_kwargs=True) for i in layers]
    try:
        ref = transformers.DynamicCache(config=cfg)
        with torch.no_grad():
            ref_logits = model(ids, cache=ref).logits[:, -1]
        captured.clear()  # the kvc run's prompt queries are the same; keep the first of that run
        cache = kvc.hf.Cache("think(ratio=0.5,coef=fp32)", model)
        assert cache.kvc.query_window == 32
        with torch.no_grad():
            logits = model(ids, cache=cache).logits[:, -1]
            model(logits.argmax(-1, keepdim=True), cache=cache)  # a decode step over the pruned keys
    finally:
        for h in handles:
            h.remove()
        cache.close()
    assert (ref_logits - logits).abs().max().item() <= TOL
    for layer in layers:
        keys = ref.layers[layer].keys[0].double().numpy()  # [Hk, n, D], rotated
        q = captured[layer][-32:]
        for h in range(hk):
            g = hq // hk
            score = np.linalg.norm(q[:, h * g:(h + 1) * g].reshape(-1, d), axis=0) * np.linalg.norm(keys[h], axis=0)
            want = np.sort(np.argsort(-score, kind="stable")[:d // 2])
            k, _ = cache.kvc.gather(cache.seq, layer, h)
            got = np.flatnonzero(np.abs(k[:96]).sum(0) > 0)
            assert got.tolist() == want.tolist(), (layer, h)


def test_lowrank_xkv_moves_the_prompt_to_latents(model, tokens):
    ids = tokens[:, :64]
    cache = kvc.hf.Cache("xkv(group=2,rank=0.1,pre_rope=0)", model)
    fp16 = kvc.hf.Cache("fp16", model.config)
    out = model.generate(ids, max_new_tokens=4, do_sample=False, cache=cache)
    model.generate(ids, max_new_tokens=4, do_sample=False, cache=fp16)
    assert out.shape[1] == 64 + 4
    assert cache.bytes_in_use() < fp16.bytes_in_use() / 2
    assert cache.kvc.tokens_held == fp16.kvc.tokens_held  # nothing evicted
    cache.reset()  # a new prompt fits new bases: a fresh kvc cache
    assert cache.kvc.tokens_held == 0
    cache.close()


def test_lowrank_refusals(model):
    with pytest.raises(ValueError, match=r"palu.*rotated keys"):
        kvc.hf.Cache("palu(rank=8)", model)
    with pytest.raises(ValueError, match=r"pre_rope=1"):
        kvc.hf.Cache("xkv(group=2,rank=16)", model)
    with pytest.raises(ValueError, match=r"think\(ratio=0.5\)' observes the prompt's last 32 rotated queries.*"
                                         r"must be the model"):
        kvc.hf.Cache("think(ratio=0.5)", model.config)
    with pytest.raises(kvc.Error, match=r"n = 4 tokens in the first append.*max\(rank, vrank\) = 16"):
        model(torch.tensor([[1, 2, 3, 4]]), cache=kvc.hf.Cache("pca(rank=16)", model.config))
