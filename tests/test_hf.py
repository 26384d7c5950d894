"""
Hugging Face interop (hf.py): Llama, Qwen2, Qwen3, Qwen3-MoE and DeepSeek-V3 checkpoints in, ours out, each checked
against transformers itself; the folder's tokenizer through tokenizer.py; sample.py from a folder.
"""
import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

import hf  # noqa: E402
from decode import generate  # noqa: E402
from model import GPTConfig  # noqa: E402

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


def logits_of(model, tokens):
    with torch.no_grad():
        if isinstance(model, hf.GPT):
            return model(tokens, targets=tokens)[0]
        return model(tokens).logits


@pytest.mark.parametrize("name", FAMILIES)
def test_import_export_match_transformers(tmp_path, name):
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))  # past rope_original_len
    theirs = hf_model(name, tmp_path / "theirs")
    ours = hf.from_hf(tmp_path / "theirs")
    assert (logits_of(ours, tokens) - logits_of(theirs, tokens)).abs().max() < 1e-4
    # greedy decoding, token for token: our KV cache (MLA: weight-absorbed) against theirs
    prompt = tokens[0, :8]
    ours_new = torch.stack(list(generate(ours, [prompt.tolist()], 12, temperature=0))).squeeze(1)
    theirs_new = theirs.generate(prompt[None], max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, 8:]
    assert ours_new.tolist() == theirs_new.tolist()
    # and back: transformers loads our export with no custom code, which re-imports exactly
    assert hf.to_hf(ours, tmp_path / "ours", eos_id=1) == theirs.config.model_type
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(exported) is type(theirs)
    assert (logits_of(exported, tokens) - logits_of(theirs, tokens)).abs().max() < 1e-4
    back = hf.from_hf(tmp_path / "ours")
    assert back.config == ours.config
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))


EXPORTED_VARIANTS = {  # our own models: the family each becomes
    "llama": ("llama", dict(n_kv_head=2)),
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
        for name, t in ours.state_dict(keep_vars=True).items():
            if name.endswith(("qkv.bias", "router.bias")) and family != "qwen3_moe":
                t.normal_(std=0.1)
    assert hf.to_hf(ours, tmp_path, eos_id=1) == family
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits_of(ours, tokens) - logits_of(theirs, tokens)).abs().max() < 1e-4
    back = hf.from_hf(tmp_path)
    assert back.config == dataclasses.replace(ours.config, mtp_depth=0)  # MTP (training only) is left out
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
            ("attention_bias", True, "attention_bias"), ("hidden_act", "gelu", "hidden_act"),
            ("layer_types", ["sliding_attention", "full_attention"], "sliding"), ("mlp_only_layers", [1], "mlp_only"),
            ("shared_expert_intermediate_size", 64, "shared_expert_intermediate_size"),
            ("model_type", "gpt_neox", "gpt_neox"), ("num_key_value_heads", 3, "n_kv_head")]:
        (path / "config.json").write_text(json.dumps({**config, field: value}))
        assert expected in error(lambda: hf.from_hf(path))
    (path / "config.json").write_text(json.dumps(config))
    tensors = hf.read_hf_tensors(path)
    from safetensors.torch import save_file
    save_file({**tensors, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, path / "model.safetensors")
    assert "q_proj.bias" in error(lambda: hf.from_hf(path))
    save_file({k: v for k, v in tensors.items() if "experts.3.down_proj" not in k}, path / "model.safetensors")
    assert "missing" in error(lambda: hf.from_hf(path))
    save_file({**tensors, "model.norm.weight": torch.ones(32)}, path / "model.safetensors")
    assert "shape" in error(lambda: hf.from_hf(path))
    # a tied head stored anyway loads when it is the embedding's copy, and refuses when it is not
    path = tmp_path / "tied"
    hf_model("qwen3_mqa_tied", path)
    tensors = hf.read_hf_tensors(path)
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, path / "model.safetensors")
    assert hf.from_hf(path).config.tie_embeddings
    save_file({**tensors, "lm_head.weight": torch.zeros(128, 64)}, path / "model.safetensors")
    assert "lm_head.weight" in error(lambda: hf.from_hf(path))


def test_export_refusals_are_one_line(tiny_model, tmp_path):
    for overrides, expected in [(dict(attention="mla", n_experts=4, moe_hidden=16), "sigmoid"),
                                (dict(n_experts=4, moe_hidden=16), "qk_norm"),
                                (dict(qk_norm=True, qkv_bias=True), "qkv_bias"),
                                (dict(qk_norm=True, n_experts=4, moe_hidden=16, n_shared_experts=1), "shared")]:
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


def test_export_writes_whole_folders_or_nothing(tiny_model, tmp_path, monkeypatch):
    """export.py refuses an hf_dir that is a file or inside the run folder, and a write that fails (a read-only or full
    disk, injected) leaves no folder, no temporary one, and a previous export as it was."""
    import os
    import runpy
    import sys
    import safetensors.torch
    from configurator import save_checkpoint
    from conftest import ROOT
    run, exported = tmp_path / "run", tmp_path / "run_hf"
    model = tiny_model()
    save_checkpoint(str(run / "ckpt.pt"), {"model": model.state_dict(), "tokenizer": "gpt2", "eos_id": 0,
                                           "model_config": dataclasses.asdict(model.config)})

    def export(hf_dir):
        monkeypatch.setattr(sys, "argv", ["export.py", f"--out_dir={run}", f"--hf_dir={hf_dir}"])
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
    assert files(tmp_path) == before

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", read_only)
        assert export(exported) == f"error: could not write {exported} (Read-only file system); nothing was written"
    assert files(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["a_file", "run"]
    assert export(exported) == 0
    assert sorted(os.listdir(exported)) == ["config.json", "generation_config.json", "model.safetensors"]
    before = files(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", read_only)
        assert export(exported).endswith("(Read-only file system); nothing was written")
    assert files(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["a_file", "run", "run_hf"]


def tokenizer_folder(path, vocab_size):
    """A byte-level BPE tokenizer.json trained on a little text, as HF folders hold them, with an eos marker."""
    import tokenizers
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


def test_folder_tokenizer_and_sample(tmp_path):
    from conftest import run_stage
    from tokenizer import Tokenizer
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


def test_train_from_hf_then_export(tmp_path, tiny_data):
    from conftest import run_stage
    from configurator import load_checkpoint
    start = tmp_path / "start"
    theirs = hf_model("qwen3_mqa_tied", start, tie_word_embeddings=False)
    theirs.resize_token_embeddings(448)  # the tiny dataset's 400 tokens, rounded up
    theirs.save_pretrained(start)
    out, exported = tmp_path / "run", tmp_path / "run_hf"
    run_stage("train.py", f"--data_dir={tiny_data}", f"--out_dir={out}", f"--init_from=hf:{start}", "--block_size=32",
              "--batch_size=4", "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--device=cpu")
    trained = load_checkpoint(str(out))
    assert trained["model_config"]["qk_norm"] and trained["model_config"]["block_size"] == 32
    run_stage("export.py", f"--out_dir={out}", f"--hf_dir={exported}")
    assert (exported / "tokenizer.model").is_file()
    back = hf.from_hf(exported)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in trained["model"].items())
    assert back.config.block_size == 32
    # a run started from a folder resumes from its checkpoint without repeating the folder's model settings
    run_stage("train.py", f"--data_dir={tiny_data}", f"--out_dir={out}", "--init_from=resume", "--block_size=32",
              "--batch_size=4", "--max_iters=3", "--eval_interval=3", "--eval_iters=1", "--device=cpu")
    assert load_checkpoint(str(out))["step"] == 3
