"""
Hugging Face interop (hf.py, export.py): Llama, Qwen2, Qwen3, Qwen3-MoE and DeepSeek-V3 checkpoints in, ours out, each
checked against transformers itself; config.json read as transformers reads it; damaged folders refused in one line;
our tokenizers exported for AutoTokenizer; the folder's tokenizer through tokenizer.py; train.py, sample.py and
export.py on folders.
"""
import dataclasses
import json
import os
import random
import runpy
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
tokenizers = pytest.importorskip("tokenizers")

import hf  # noqa: E402
from conftest import ROOT, read_log, run_stage, run_train  # noqa: E402
from decode import generate  # noqa: E402
from model import GPTConfig  # noqa: E402
from tokenizer import ESCAPE, SPACE_MARK, Tokenizer  # noqa: E402

SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
YARN_ROPE = dict(rope_type="yarn", rope_theta=1000.0, factor=4.0, original_max_position_embeddings=16)
DEEPSEEK = dict(moe_intermediate_size=32, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=8, v_head_dim=8)
FAMILIES = {  # name: (config class, its settings); head_dim 16 = hidden/heads unless said otherwise
    "llama_mha_untied": (transformers.LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=False,
                                                        rope_parameters=dict(rope_type="default", rope_theta=500.0))),
    "llama3_gqa_tied_rope_scaled": (transformers.LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=True,
                                                                   rope_parameters=LLAMA3_ROPE)),
    "llama_yarn": (transformers.LlamaConfig, dict(num_key_value_heads=2, rope_parameters=YARN_ROPE)),
    # YaRN's mscale beside mscale_all_dim outside DeepSeek: only the tables' temperature, their ratio
    "llama_yarn_mscale": (transformers.LlamaConfig, dict(num_key_value_heads=2, rope_parameters=dict(
        YARN_ROPE, mscale=1.0, mscale_all_dim=0.5))),
    "qwen2_qkv_bias": (transformers.Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3_head_dim_32": (transformers.Qwen3Config, dict(num_key_value_heads=2, head_dim=32,
                                                         tie_word_embeddings=False)),
    "qwen3_mqa_tied": (transformers.Qwen3Config, dict(num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(num_key_value_heads=2, head_dim=16, num_experts=4,
                                                    num_experts_per_tok=2, moe_intermediate_size=32,
                                                    norm_topk_prob=True, mlp_only_layers=[0])),
    "deepseek_v3_grouped": (transformers.DeepseekV3Config, dict(DEEPSEEK, q_lora_rank=16, qk_rope_head_dim=4,
                                                                n_group=4, topk_group=2)),
    "deepseek_v3_yarn": (transformers.DeepseekV3Config, dict(
        DEEPSEEK, q_lora_rank=None, qk_rope_head_dim=8, n_group=1, topk_group=1, norm_topk_prob=False,
        rope_parameters=dict(YARN_ROPE, mscale=1.0, mscale_all_dim=0.7))),
}
# text that a tokenizer must take apart exactly: code, Unicode, emoji, runs of spaces, tabs, newlines, our escapes
MIXED = ("def f(x):\n\treturn x  *  2   # 注释\r\n\n    naïve café — 東京 🚀👍🏽 ﬁ e\u0301\n\n\n  \t spaces    and\ttabs "
         f"{SPACE_MARK}x {SPACE_MARK}{SPACE_MARK} {ESCAPE}{ESCAPE} 12345 it's\x00 end ")


def hf_model(name, path, **changes):
    """
    A random transformers model of family `name`, saved to path: weights larger than the init's, so that logits are
    far apart and greedy decoding does not just repeat one token; norm gains and DeepSeek's routing bias random too,
    so that they are tested.
    """
    config_class, extra = FAMILIES[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**{**SHAPE, **extra, **changes}),
                                                          dtype=torch.float32)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                torch.nn.init.uniform_(p, 0.5, 1.5)
            else:
                torch.nn.init.normal_(p, std=0.2)
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                torch.nn.init.normal_(b, std=0.1)
    model.save_pretrained(path)
    return model.eval()


def rewrite_config(path, drop=(), **changes):
    """config.json of the folder with the keys `drop` left out and `changes` made."""
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**{k: v for k, v in config.items() if k not in drop}, **changes}))


def logits_of(model, tokens):
    with torch.no_grad():
        if isinstance(model, hf.GPT):
            return model(tokens, targets=tokens)[0]
        return model(tokens).logits


def same_config(a, b):
    """Equal configs, but for the last bits of a float (YaRN's temperature, solved for on the way back)."""
    a, b = dataclasses.asdict(a), dataclasses.asdict(b)
    return a.keys() == b.keys() and all(a[k] == b[k] or abs(a[k] - b[k]) < 1e-12 * abs(a[k]) for k in a)


TOKENS = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))  # past rope_original_len


def matches(ours, theirs, tokens=TOKENS):
    return (logits_of(ours, tokens) - logits_of(theirs, tokens)).abs().max() < 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_import_export_match_transformers(tmp_path, name):
    theirs = hf_model(name, tmp_path / "theirs")
    ours = hf.from_hf(tmp_path / "theirs")
    assert matches(ours, theirs)
    # greedy decoding, token for token: our KV cache (MLA: weight-absorbed) against theirs
    prompt = TOKENS[0, :8]
    ours_new = torch.stack(list(generate(ours, [prompt.tolist()], 12, temperature=0))).squeeze(1)
    theirs_new = theirs.generate(prompt[None], max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, 8:]
    assert ours_new.tolist() == theirs_new.tolist()
    # and back: transformers loads our export with no custom code, which re-imports exactly
    assert hf.to_hf(ours, tmp_path / "ours", eos_id=1) == theirs.config.model_type
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(exported) is type(theirs)
    assert matches(exported, theirs)
    back = hf.from_hf(tmp_path / "ours")
    assert back.config == ours.config if name != "llama_yarn_mscale" else same_config(back.config, ours.config)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))


EXPORTED_VARIANTS = {  # our own models: the family each becomes
    "llama": ("llama", dict(n_kv_head=2)),
    "llama_yarn_mscale": ("llama", dict(rope_scaling="yarn", rope_factor=4.0, rope_original_len=8, yarn_mscale=2.0)),
    "qwen2": ("qwen2", dict(qkv_bias=True, tie_embeddings=False)),
    "qwen3_yarn": ("qwen3", dict(qk_norm=True, head_dim=16, rope_scaling="yarn", rope_factor=2.0,
                                 rope_original_len=16)),
    "qwen3_moe": ("qwen3_moe", dict(qk_norm=True, n_experts=4, moe_topk=2, moe_hidden=16, moe_every=2)),
    "deepseek_v3": ("deepseek_v3", dict(attention="mla", q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
                                        n_experts=4, moe_topk=2, moe_hidden=16, n_shared_experts=1, moe_first_dense=1,
                                        router_scoring="sigmoid", routed_scaling=2.5, moe_groups=2, moe_topk_groups=1,
                                        mtp_depth=1)),
    "mla_dense": ("deepseek_v3", dict(attention="mla", kv_lora_rank=16, qk_rope_head_dim=4)),
}


@pytest.mark.parametrize("name", EXPORTED_VARIANTS)
def test_our_models_export_to_their_family(tmp_path, tiny_model, name):
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    family, overrides = EXPORTED_VARIANTS[name]
    ours = tiny_model(**overrides).eval()
    with torch.no_grad():  # random biases and selection biases, so that their export is tested
        for key, t in ours.state_dict(keep_vars=True).items():
            if key.endswith(("qkv.bias", "router.bias")) and family != "qwen3_moe":
                t.normal_(std=0.1)
    assert hf.to_hf(ours, tmp_path, eos_id=1) == family
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert matches(ours, theirs, tokens)
    back = hf.from_hf(tmp_path)
    expected = dataclasses.replace(ours.config, mtp_depth=0)  # MTP (training only) is left out
    assert back.config == expected if name != "llama_yarn_mscale" else same_config(back.config, expected)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items() if not k.startswith("mtp"))


def error(call):
    with pytest.raises(ValueError) as e:
        call()
    message = str(e.value)
    assert message and "\n" not in message
    return message


def test_import_refusals_are_one_line(tmp_path):
    path = tmp_path / "qwen3"
    hf_model("qwen3_moe", path)
    config = json.loads((path / "config.json").read_text())
    for field, value, expected in [
            ("rope_parameters", {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}, "dynamic"),
            ("rope_parameters", {**YARN_ROPE, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
            ("rope_parameters", {**YARN_ROPE, "factor": "4"}, "RoPE parameter factor that is not a number"),
            ("rope_parameters", {**YARN_ROPE, "rope_theta": None}, "RoPE parameter rope_theta that is not a number"),
            ("rope_parameters", {"rope_type": "llama3", "factor": 8.0}, "llama3 RoPE without"),
            ("rope_parameters", [1], "rope_parameters is not an object"),
            ("rope_scaling", {"type": "linear", "factor": 2.0}, "linear"),  # it replaces rope_parameters
            ("attention_bias", True, "attention_bias"), ("hidden_act", "gelu", "hidden_act"),
            ("layer_types", ["sliding_attention", "full_attention"], "sliding"), ("mlp_only_layers", [1], "mlp_only"),
            ("use_sliding_window", True, "sliding"),  # Qwen3-MoE slides every layer's window
            ("shared_expert_intermediate_size", 64, "shared_expert_intermediate_size"),
            ("model_type", "gpt_neox", "gpt_neox"), ("num_key_value_heads", 3, "n_kv_head"),
            # a field of the wrong type, null, or out of range, named with what it needs
            ("hidden_size", "64", 'hidden_size="64", where a positive integer is needed'),
            ("num_experts_per_tok", None, "num_experts_per_tok=null, where a non-negative integer is needed"),
            ("num_attention_heads", 0, "num_attention_heads=0, where a positive integer is needed"),
            ("rms_norm_eps", "1e-6", "rms_norm_eps"), ("norm_topk_prob", 1, "norm_topk_prob=1, where true or false"),
            ("mlp_only_layers", "0", "mlp_only_layers")]:
        (path / "config.json").write_text(json.dumps({**config, field: value}))
        assert expected in error(lambda: hf.from_hf(path))
    rewrite_config(path, drop=["vocab_size"])
    assert "config.json has no vocab_size" in error(lambda: hf.from_hf(path))
    # num_experts_per_tok left out is transformers' 8, more than the 4 experts
    (path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "num_experts_per_tok"}))
    assert "moe_topk" in error(lambda: hf.from_hf(path))
    (path / "config.json").write_text(json.dumps(config))
    tensors = hf.read_hf_tensors(path)
    from safetensors.torch import save_file
    save_file({**tensors, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, path / "model.safetensors")
    assert "q_proj.bias" in error(lambda: hf.from_hf(path))
    save_file({k: v for k, v in tensors.items() if "experts.3.down_proj" not in k}, path / "model.safetensors")
    assert "missing" in error(lambda: hf.from_hf(path))
    save_file({**tensors, "model.norm.weight": torch.ones(32)}, path / "model.safetensors")
    assert "shape" in error(lambda: hf.from_hf(path))
    save_file({**tensors, "model.norm.weight": torch.ones(64, dtype=torch.int8)}, path / "model.safetensors")
    assert "model.norm.weight has dtype torch.int8" in error(lambda: hf.from_hf(path))  # not cast to a weight
    # a tied head stored anyway loads when it is the embedding's copy, and refuses when it is not
    path = tmp_path / "tied"
    hf_model("qwen3_mqa_tied", path)
    tensors = hf.read_hf_tensors(path)
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, path / "model.safetensors")
    assert hf.from_hf(path).config.tie_embeddings
    save_file({**tensors, "lm_head.weight": torch.zeros(128, 64)}, path / "model.safetensors")
    assert "lm_head.weight" in error(lambda: hf.from_hf(path))


def test_hub_configs_with_inert_fields_load(tmp_path):
    """SmolLM2's config.json (nanotron's is_llama_config, rope_interleaved false) and transformers 4.48's
    _attn_implementation_autoset: fields transformers' Llama does not read; an interleaved RoPE is still refused."""
    path = tmp_path / "smollm2"
    theirs = hf_model("llama_mha_untied", path)
    rewrite_config(path, is_llama_config=True, rope_interleaved=False, _attn_implementation_autoset=True)
    assert matches(hf.from_hf(path), theirs)
    rewrite_config(path, rope_interleaved=True)
    assert "rope_interleaved=true" in error(lambda: hf.from_hf(path))


def test_export_refusals_are_one_line(tiny_model, tmp_path):
    for overrides, expected in [(dict(attention="mla", n_experts=4, moe_hidden=16), "sigmoid"),
                                (dict(n_experts=4, moe_hidden=16), "qk_norm"),
                                (dict(qk_norm=True, qkv_bias=True), "qkv_bias"),
                                (dict(qk_norm=True, n_experts=4, moe_hidden=16, n_shared_experts=1), "shared"),
                                # Llama, Qwen and DeepSeek-V3 all have a SiLU-gated MLP and uncapped logits
                                (dict(mlp="relu2"), "mlp='relu2' has no Hugging Face equivalent"),
                                (dict(logit_softcap=30.0), "logit_softcap=30.0 has no Hugging Face equivalent"),
                                # nor value embeddings or residuals, the embedding mixed back in before each block or
                                # U-net skips
                                (dict(value_embeds="0,1"), "value_embeds='0,1' has no Hugging Face equivalent"),
                                (dict(value_residual=True), "value_residual=True has no Hugging Face equivalent"),
                                (dict(x0_mix=True), "x0_mix=True has no Hugging Face equivalent"),
                                (dict(unet_skips=True), "unet_skips=True has no Hugging Face equivalent")]:
        assert expected in error(lambda: hf.to_hf(tiny_model(**overrides), tmp_path))
    # every field that neither shapes training only nor maps to a HF field refuses when set away from its default
    # (MoBA, spans, linear attention, hyper-connections, Engram, ...), naming itself
    config = GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=32)
    others = [f for f in dataclasses.fields(GPTConfig) if f.name not in hf.EXPRESSED | hf.TRAINING_ONLY]
    for f in others:
        value = getattr(config, f.name)
        changed = dataclasses.replace(config)
        object.__setattr__(changed, f.name, not value if isinstance(value, bool) else
                           value + 1 if isinstance(value, (int, float)) else value + "x")
        assert f.name in error(lambda: hf.hf_family(changed))


def test_damaged_folders_are_one_line(tmp_path, monkeypatch, capsys):
    """Each damaged file stops in one line naming it; the files transformers does not read are not read."""
    path = tmp_path / "theirs"
    theirs = hf_model("llama_mha_untied", path)
    good = {name: (path / name).read_bytes() for name in os.listdir(path)}

    def restore():
        for name in os.listdir(path):
            os.remove(path / name)
        for name, data in good.items():
            (path / name).write_bytes(data)

    weights = good["model.safetensors"]
    for name, data, expected in [
            ("model.safetensors", weights[:len(weights) // 2], "model.safetensors is damaged"),  # truncated
            ("model.safetensors", b"", "model.safetensors is damaged"),  # empty
            ("model.safetensors", weights[:12], "model.safetensors is damaged"),  # its header cut
            ("config.json", b"{", "config.json is not valid JSON"), ("config.json", b"[1]", "not a JSON object"),
            ("config.json", b'{"model_type": "llama\xff"}', "config.json is not valid JSON")]:
        (path / name).write_bytes(data)
        assert expected in error(lambda: hf.from_hf(path))
        restore()
    # the same in a stage: one line, no traceback
    (path / "model.safetensors").write_bytes(weights[:100])
    monkeypatch.setattr(sys, "argv", ["sample.py", f"--init_from=hf:{path}", "--start=a", "--device=cpu"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(os.path.join(ROOT, "sample.py"))
    assert str(stop.value).startswith(f"error: {path / 'model.safetensors'} is damaged") and "\n" not in str(stop.value)
    # pytorch_model.bin: a corrupt one stops; a Trainer's training_args.bin beside a good one is not read
    os.remove(path / "model.safetensors")
    (path / "pytorch_model.bin").write_bytes(b"not a zip file")
    assert "pytorch_model.bin is damaged" in error(lambda: hf.from_hf(path))
    torch.save(theirs.state_dict(), path / "pytorch_model.bin")
    (path / "training_args.bin").write_bytes(b"a pickled TrainingArguments")
    assert matches(hf.from_hf(path), theirs)
    # shards, as transformers writes them: they load; one missing is named by its file, a damaged index by its own
    restore()
    os.remove(path / "model.safetensors")
    theirs.save_pretrained(path, max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and matches(hf.from_hf(path), theirs)
    os.rename(path / shards[-1], tmp_path / "aside")
    missing = error(lambda: hf.from_hf(path))
    assert f"{shards[-1]}, a shard that model.safetensors.index.json lists, is missing" in missing
    os.rename(tmp_path / "aside", path / shards[-1])
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": [1]}))
    assert "has no weight_map" in error(lambda: hf.from_hf(path))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # transformers' shared experts of width 0
def test_config_read_as_transformers_reads_it(tmp_path, monkeypatch):
    """rope_scaling beside rope_parameters, fields left out (transformers' defaults), sliding windows that no layer
    uses, DeepSeek-V3 without shared experts and with mscale_all_dim alone, and hf:~ expanded."""
    # a Qwen3 folder saved by transformers 5 holds rope_parameters; YaRN added as its model card says, as rope_scaling
    path = tmp_path / "qwen3"
    hf_model("qwen3_head_dim_32", path)
    rewrite_config(path, rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert theirs.config.rope_parameters["rope_type"] == "yarn"
    ours = hf.from_hf(path)
    assert ours.config.rope_scaling == "yarn" and matches(ours, theirs)
    # each family's fields left out at transformers' defaults: DeepSeek-V3's routed_scaling_factor 2.5, n_group 8,
    # topk_group 4, q_lora_rank 1536, ...; Qwen3's head_dim 128; Llama's num_key_value_heads (= heads)
    for name, dropped, shape in [
            ("deepseek_v3_grouped", dict(n_group=8, topk_group=4, routed_scaling_factor=2.5, q_lora_rank=1536,
                                         first_k_dense_replace=3, norm_topk_prob=True, n_shared_experts=1,
                                         rope_interleave=True), dict(n_routed_experts=16, num_hidden_layers=4)),
            ("qwen3_mqa_tied", dict(head_dim=128), {}),
            ("llama_mha_untied", dict(num_key_value_heads=4, max_position_embeddings=2048), {})]:
        path = tmp_path / name
        theirs = hf_model(name, path, **dropped, **shape)
        rewrite_config(path, drop=dropped)
        assert matches(hf.from_hf(path), transformers.AutoModelForCausalLM.from_pretrained(path))
        assert matches(hf.from_hf(path), theirs)  # the values the folder was made with
    # Qwen2/Qwen3 with use_sliding_window whose layers all stay full (by max_window_layers, or by layer_types)
    path = tmp_path / "qwen2"
    theirs = hf_model("qwen2_qkv_bias", path, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    rewrite_config(path, drop=["layer_types"])
    assert matches(hf.from_hf(path), theirs)
    rewrite_config(path, max_window_layers=1)  # the second layer slides
    assert "sliding" in error(lambda: hf.from_hf(path))
    rewrite_config(path, layer_types=["full_attention"] * 2)
    assert matches(hf.from_hf(path), theirs)
    # DeepSeek-V3 without shared experts (transformers keeps them at width 0), and YaRN with mscale_all_dim alone
    path = tmp_path / "deepseek"
    theirs = hf_model("deepseek_v3_yarn", path, n_shared_experts=0,
                      rope_parameters=dict(YARN_ROPE, mscale_all_dim=0.7))
    assert matches(hf.from_hf(path), theirs)
    monkeypatch.setenv("HOME", str(tmp_path))
    model, tokenizer_path, _ = hf.load_model("hf:~/deepseek")
    assert tokenizer_path == str(path) and model.config.n_shared_experts == 0


def byte_level_bpe(texts, vocab_size):
    """A byte-level BPE trained on texts (tokenizers), as tiktoken's ranks: bytes -> id."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    tokens = sorted(tok.get_vocab().items(), key=lambda item: item[1])
    return {bytes(byte_of[c] for c in token): i for i, (token, _) in enumerate(tokens)}


def random_texts(seed, n):
    rng = random.Random(seed)
    pieces = [*"abcdefxyz ():*#.,0123456789'\n\t\r", " ", "  ", "    ", "é", "東京", "🚀", "\u2028", SPACE_MARK, ESCAPE,
              "'s", "return", "def "]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def assert_tokenizer_exported(ours, folder):
    """The exported folder's tokenizer, in AutoTokenizer and in ours, gives our ids for any text; its special and
    chat tokens are ours; a document starts after an eos, as in training."""
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for text in [MIXED, *random_texts(0, 200)]:
        assert theirs.encode(text, add_special_tokens=False) == theirs(text)["input_ids"] == ours.encode(text), text
        assert theirs.decode(ours.encode(text)) == text or ESCAPE in text
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (ours.eos_id, ours.eos_id, ours.pad_id)
    chat = theirs.apply_chat_template([{"role": "user", "content": "2+3="}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
    assert chat == [ours.eos_id, ours.special["user"], *ours.encode("2+3="), ours.special["end"],
                    ours.special["assistant"]]
    loaded = Tokenizer.load(str(folder))
    assert loaded.encode(MIXED) == ours.encode(MIXED) and loaded.decode(ours.encode(MIXED)) == MIXED
    assert (loaded.bos_id, loaded.eos_id) == (ours.eos_id, ours.eos_id)
    config = json.loads((folder / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == ours.eos_id


def test_export_writes_whole_folders_or_nothing(tiny_model, tmp_path, monkeypatch, capsys):
    """export.py refuses an hf_dir that is a file or inside the run folder, and a write that fails (a read-only or full
    disk, injected) leaves no folder, no temporary one, and a previous export as it was. A GPT-2 run (tiktoken's
    files, offline: a stand-in trained here) gets a tokenizer.json; the weights keep the checkpoint's dtype."""
    import safetensors.torch
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str
    from configurator import save_checkpoint
    text = [MIXED, open(os.path.join(ROOT, "tokenizer.py"), encoding="utf-8").read()]
    ranks = byte_level_bpe(text, 600)
    gpt2 = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: gpt2)
    run, exported = tmp_path / "run", tmp_path / "run_hf"
    model = tiny_model(vocab_size=len(ranks) + 5)
    save_checkpoint(str(run / "ckpt.pt"), {"model": {k: v.bfloat16() for k, v in model.state_dict().items()},
                                           "tokenizer": "gpt2", "eos_id": len(ranks),
                                           "model_config": dataclasses.asdict(model.config)})

    def export(hf_dir, *args):
        monkeypatch.setattr(sys, "argv", ["export.py", f"--out_dir={run}", f"--hf_dir={hf_dir}", *args])
        with pytest.raises(SystemExit) as stop:
            runpy.run_path(os.path.join(ROOT, "export.py"))
            raise SystemExit(0)
        return stop.value.code

    def files(folder):
        return {path.relative_to(tmp_path): path.read_bytes() for path in folder.rglob("*") if path.is_file()}

    (tmp_path / "a_file").write_text("mine")
    before = files(tmp_path)
    assert export(tmp_path / "a_file") == (f"error: hf_dir {tmp_path / 'a_file'} is a file, not a folder: choose "
                                           "another hf_dir")
    for inside in (run, run / "hf"):
        assert export(inside).startswith(f"error: hf_dir {inside} is inside the run folder {run}: choose one outside")
    assert export(exported, "--dtype=fp8").startswith("error: unknown dtype 'fp8'")
    assert files(tmp_path) == before

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", read_only)
        assert export(exported) == f"error: could not write {exported} (Read-only file system); nothing was written"
    assert files(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["a_file", "run"]
    assert export(exported) == 0
    assert sorted(os.listdir(exported)) == ["config.json", "generation_config.json", "model.safetensors",
                                            "tokenizer.json", "tokenizer_config.json"]
    assert_tokenizer_exported(Tokenizer.load("gpt2"), exported)
    # the checkpoint's bf16 as it is, or the dtype asked for; transformers reads either
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported)
    assert theirs.dtype == torch.bfloat16
    assert json.loads((exported / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert hf.read_hf_tensors(exported)["model.norm.weight"].dtype == torch.bfloat16
    before = files(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", read_only)
        assert export(exported).endswith("(Read-only file system); nothing was written")
    assert files(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["a_file", "run", "run_hf"]
    assert export(exported, "--dtype=float32") == 0
    assert hf.read_hf_tensors(exported)["model.norm.weight"].dtype == torch.float32

    def offline(name):
        raise ValueError("no connection")

    # into a folder holding shards and their index (a save of transformers': vLLM would read them, not ours), a
    # tokenizer.json and chat template that this export does not write, and a file of the user's, kept; tiktoken
    # cannot fetch its files: the model goes alone, with a note
    (exported / "README.md").write_text("mine")
    (exported / "chat_template.jinja").write_text("an earlier model's")
    theirs.save_pretrained(exported, max_shard_size="40KB")
    assert len(os.listdir(exported)) > 8
    with monkeypatch.context() as patch:
        patch.setattr(tiktoken, "get_encoding", offline)
        capsys.readouterr()
        assert export(exported) == 0
    assert sorted(os.listdir(exported)) == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    assert (exported / "README.md").read_text() == "mine"
    assert "note: no tokenizer.json written: cannot load the gpt2 tokenizer files (offline?)" in capsys.readouterr().out


def tokenizer_folder(path, vocab_size):
    """A byte-level BPE tokenizer.json trained on a little text, as HF folders hold them, with an eos marker."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    text = ["def f(x):\n    return x * 2\n", "the cat sat on the mat. ", "naïve café — 東京 🚀"] * 20
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    path.mkdir(exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return tok.get_vocab_size()


def test_a_copied_folder_tokenizer_keeps_the_special_ids_of_config_json(tmp_path):
    """Qwen3's bos is config.json's bos_token_id alone: the copy that prepare.py and train.py make keeps it."""
    from configurator import copy_tokenizer
    tokenizer_folder(tmp_path / "model", 320)
    (tmp_path / "model" / "config.json").write_text(json.dumps({"bos_token_id": 5, "model_type": "qwen3"}))
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # transformers 5 saves it apart: copied too
    (tmp_path / "model" / "chat_template.jinja").write_text(template)
    (tmp_path / "copy").mkdir()
    assert copy_tokenizer(str(tmp_path / "model"), str(tmp_path / "copy")) == "tokenizer.json"
    assert (tmp_path / "copy" / "chat_template.jinja").read_text() == template
    original, copy = Tokenizer.load(str(tmp_path / "model")), Tokenizer.load(str(tmp_path / "copy" / "tokenizer.json"))
    assert original.special == copy.special and original.bos_id == 5
    (tmp_path / "copy" / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    with pytest.raises(ValueError, match="tokenizer.json is damaged"):
        Tokenizer.load(str(tmp_path / "copy"))
    (tmp_path / "model" / "tokenizer_config.json").write_text("{")
    with pytest.raises(ValueError, match="tokenizer_config.json is damaged"):
        Tokenizer.load(str(tmp_path / "model"))


def test_folder_tokenizer_and_sample(tmp_path):
    n_vocab = tokenizer_folder(tmp_path, 320)
    ours = Tokenizer.load(str(tmp_path))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "def g(y):\n    return the café 東京 <|endoftext|> 🚀 ünseen\n"
    plain = text.replace("<|endoftext|>", "")
    assert ours.kind == "hf" and ours.vocab_size == n_vocab and ours.bos_id is None
    assert ours.encode(plain) == theirs.encode(plain, add_special_tokens=False)
    ids = ours.encode(text)
    assert ours.decode(ids) == text and ours.eos_id not in ids  # a marker in the text stays text
    assert ours.encode_batch([text, "cat"]) == [ids, ours.encode("cat")]
    assert ours.decode([ours.eos_id]) == "<|endoftext|>"
    # sample.py from the folder: the same greedy continuation as transformers' generate
    model = hf_model("qwen3_mqa_tied", tmp_path, vocab_size=n_vocab)
    prompt = ours.encode("the cat")
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):]
    result = run_stage("sample.py", f"--init_from=hf:{tmp_path}", "--start=the cat", "--num_samples=1",
                       "--max_new_tokens=6", "--temperature=0", "--device=cpu", "--block_size=32")
    assert result.stdout.startswith("the cat" + ours.decode(expected.tolist()))


def test_train_from_hf_then_export(tmp_path, tiny_data, monkeypatch, capsys):
    """train.py from a folder: the training-only flags apply (MTP modules start afresh), any other model flag must be
    the folder's, run.json records what trains; export gives our BPE as a tokenizer.json, and sample.py continues
    alike from the checkpoint and from the exported folder; the run resumes from its checkpoint."""
    from configurator import load_checkpoint
    start = tmp_path / "start"
    # the shape run_train gives on its command line (n_layer, n_embd, n_head, block_size): the folder's own
    theirs = hf_model("qwen3_mqa_tied", start, tie_word_embeddings=False, hidden_size=32)
    theirs.resize_token_embeddings(448)  # the tiny dataset's 400 tokens, rounded up
    with torch.no_grad():  # ids past the tokenizer's never win, so that both samples below decode alike
        theirs.lm_head.weight[400:] = 0
    theirs.save_pretrained(start)
    out, exported = tmp_path / "run", tmp_path / "run_hf"
    args = [f"--data_dir={tiny_data}", f"--out_dir={out}", f"--init_from=hf:{start}", "--batch_size=4",
            "--eval_iters=1", "--eval_interval=2"]
    for flag, expected in [("--n_kv_head=2", "has n_kv_head=1, but the command line says n_kv_head=2"),
                           ("--qk_norm=False", "qk_norm"), ("--vocab_size=512", "vocab_size")]:
        with pytest.raises(SystemExit) as stop:
            run_train(monkeypatch, *args, "--max_iters=2", flag)
        assert str(stop.value).startswith(f"error: {start} has ") and expected in str(stop.value)
        assert "\n" not in str(stop.value)
    training = dict(dropout=0.1, mtp_depth=1, mtp_lambda=0.2, aux_loss_coef=0.01, router_z_loss_coef=1e-3)
    train_py = run_train(monkeypatch, *args, "--max_iters=2", "--n_kv_head=1", "--qk_norm=True",
                         *[f"--{k}={v}" for k, v in training.items()])
    trained = load_checkpoint(str(out))
    manifest = json.loads((out / "run.json").read_text())["config"]
    for config in (trained["model_config"], manifest, dataclasses.asdict(train_py["raw_model"].config)):
        assert {k: config[k] for k in training} == training
        assert config["qk_norm"] and config["n_kv_head"] == 1 and config["head_dim"] == 16
        assert config["block_size"] == 32
    assert any(k.startswith("mtp.0.") for k in trained["model"]) and any("mtp_loss" in r for r in read_log(out))
    monkeypatch.setattr(sys, "argv", ["export.py", f"--out_dir={out}", f"--hf_dir={exported}"])
    runpy.run_path(os.path.join(ROOT, "export.py"))
    assert "note: the 1 MTP module(s) are training-only and left out" in capsys.readouterr().out
    assert (exported / "tokenizer.model").is_file()
    back = hf.from_hf(exported)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in trained["model"].items() if not k.startswith("mtp"))
    assert back.config.block_size == 32
    assert_tokenizer_exported(Tokenizer.load(str(tiny_data / "tokenizer.model")), exported)
    samples = []
    for source in (f"--out_dir={out}", f"--init_from=hf:{exported}"):
        monkeypatch.setattr(sys, "argv", ["sample.py", source, "--start=def ", "--num_samples=1", "--max_new_tokens=8",
                                          "--temperature=0", "--device=cpu", "--block_size=32"])
        runpy.run_path(os.path.join(ROOT, "sample.py"))
        samples.append(capsys.readouterr().out)
    assert samples[0] == samples[1] and samples[0].startswith("def ")
    # a run started from a folder resumes from its checkpoint without repeating the folder's model settings
    run_train(monkeypatch, *args[:2], "--init_from=resume", "--batch_size=4", "--eval_iters=1", "--max_iters=3",
              "--eval_interval=3")
    assert load_checkpoint(str(out))["step"] == 3

