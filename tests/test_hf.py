"""Hugging Face interop (hf.py): Llama and Qwen3 checkpoints in, ours out, checked against transformers itself."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import hf  # noqa: E402

SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500.0)
FAMILIES = {
    "llama_mha_untied": (transformers.LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama_gqa_tied": (transformers.LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3_gqa_untied": (transformers.Qwen3Config, dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen3_mqa_tied": (transformers.Qwen3Config, dict(num_key_value_heads=1, tie_word_embeddings=True)),
}


def hf_model(name, path):
    """
    A random transformers model of family `name`, saved to path: weights larger than the init's, so that logits are
    far apart and greedy decoding does not just repeat one token; norm gains random too, so that they are tested.
    """
    config_class, extra = FAMILIES[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**SHAPE, **extra), dtype=torch.float32)
    for pname, p in model.named_parameters():
        if "norm" in pname:
            torch.nn.init.uniform_(p, 0.5, 1.5)
        else:
            torch.nn.init.normal_(p, std=0.2)
    model.save_pretrained(path)
    return model.eval()


def logits_of(model, tokens):
    with torch.no_grad():
        if isinstance(model, hf.GPT):
            return model(tokens, targets=tokens)[0]
        return model(tokens).logits


def test_import_matches_transformers(tmp_path):
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    for name in FAMILIES:
        theirs = hf_model(name, tmp_path / name)
        ours = hf.from_hf(tmp_path / name)
        assert ours.config.qk_norm == name.startswith("qwen3")
        assert (logits_of(ours, tokens) - logits_of(theirs, tokens)).abs().max() < 1e-4, name
        # greedy decoding, token for token: our KV cache against theirs
        prompt = tokens[0, :8]
        ours_new = torch.stack(list(ours.generate([prompt.tolist()], 8, temperature=0))).squeeze(1)
        theirs_new = theirs.generate(prompt[None], max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, 8:]
        assert ours_new.tolist() == theirs_new.tolist(), name


def test_export_loads_in_transformers_and_round_trips(tmp_path, tiny_model):
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    for overrides in (dict(n_kv_head=2), dict(qk_norm=True, tie_embeddings=False)):
        ours = tiny_model(**overrides).eval()
        out = tmp_path / str(len(overrides))
        hf.to_hf(ours, out, eos_id=1)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(theirs).__name__ == ("Qwen3ForCausalLM" if ours.config.qk_norm else "LlamaForCausalLM")
        assert (logits_of(ours, tokens) - logits_of(theirs, tokens)).abs().max() < 1e-4
        back = hf.from_hf(out)
        assert back.config == ours.config
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))


def test_refusals_are_one_line(tmp_path, tiny_model):
    def error(call):
        with pytest.raises(SystemExit) as e:
            call()
        message = str(e.value)
        assert message.startswith("error:") and "\n" not in message
        return message

    path = tmp_path / "llama"
    hf_model("llama_gqa_tied", path)
    config = json.loads((path / "config.json").read_text())
    for field, value, expected in [("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "RoPE"),
                                   ("attention_bias", True, "attention_bias"), ("head_dim", 32, "head_dim"),
                                   ("model_type", "deepseek_v3", "deepseek_v3")]:
        (path / "config.json").write_text(json.dumps({**config, field: value}))
        assert expected in error(lambda: hf.from_hf(path))
    (path / "config.json").write_text(json.dumps(config))
    tensors = hf.read_hf_tensors(path)
    from safetensors.torch import save_file
    save_file({**tensors, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, path / "model.safetensors")
    assert "q_proj.bias" in error(lambda: hf.from_hf(path))
    save_file({k: v for k, v in tensors.items() if "down_proj" not in k}, path / "model.safetensors")
    assert "missing" in error(lambda: hf.from_hf(path))
    for overrides in (dict(attention="mla"), dict(n_experts=4)):
        assert "equivalent" in error(lambda: hf.to_hf(tiny_model(**overrides), tmp_path / "x"))


def test_train_from_hf_then_export(tmp_path, tiny_data):
    from conftest import run_stage
    from configurator import load_checkpoint
    start = tmp_path / "start"
    theirs = hf_model("qwen3_gqa_untied", start)
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
