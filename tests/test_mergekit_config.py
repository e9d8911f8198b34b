"""mergekit YAML configs read as they are: key translation, parameter precedence and filters,
and every unsupported or unknown key an error naming it; `safepatch merge` on such a file."""
import pytest
import torch
import yaml
from merge_helpers import load_dir

from safepatch_merge.cli import main
from safepatch_merge.errors import ConfigError
from safepatch_merge.merge.mergekit_config import from_mergekit, parse_classic_section
from safepatch_merge.testing import make_tiny_model, perturbed_copy, save_model_dir

BASIC = {
    "merge_method": "ties",
    "base_model": "org/base",
    "models": [
        {"model": "org/base"},
        {"model": "org/a", "parameters": {"weight": 0.7, "density": 0.4}},
        {"model": "org/b", "parameters": {"weight": 0.3}},
    ],
    "parameters": {"density": 0.2, "normalize": False, "int8_mask": True},
    "dtype": "bfloat16",
}


def test_translation_to_native_config():
    native = from_mergekit(BASIC)
    assert native == {
        "method": "ties", "backbone": "org/base",
        "models": [{"model": "org/a", "parameters": {"weight": 0.7, "density": 0.4}},
                   {"model": "org/b", "parameters": {"weight": 0.3}}],
        "parameters": {"density": 0.2, "normalize": False, "int8_mask": True},
        "output": {"dtype": "bfloat16"},
    }
    raw = dict(BASIC, out_dtype="torch.float16")
    assert from_mergekit(raw)["output"] == {"dtype": "float16"}


def test_precedence_defaults_and_filters():
    plan = parse_classic_section("ties", "org/base", BASIC["models"], BASIC["parameters"])
    p = plan.tensor_params("model.layers.0.mlp.up_proj.weight")
    assert p.weights == (0.7, 0.3)
    assert p.densities == (0.4, 0.2)  # model's own, else the top-level one
    assert (p.normalize, p.rescale, p.lam) == (False, False, 1.0)  # rescale: ties default

    models = [{"model": "a", "parameters": {
        "weight": [{"filter": "mlp", "value": 2.0}, {"filter": "self_attn", "value": "1e-1"}],
        "density": {"filter": "embed", "value": 0.9}}}]
    params = {"weight": 0.5, "density": 0.6, "lambda": 1.5,
              "normalize": [{"filter": "lm_head", "value": "yes"}]}
    plan = parse_classic_section("dare_ties", "base", models, params)
    mlp = plan.tensor_params("model.layers.1.mlp.down_proj.weight")
    attn = plan.tensor_params("model.layers.1.self_attn.q_proj.weight")
    emb = plan.tensor_params("model.embed_tokens.weight")
    head = plan.tensor_params("lm_head.weight")
    assert (mlp.weights, mlp.densities, mlp.lam) == ((2.0,), (0.6,), 1.5)
    assert attn.weights == (0.1,)  # "1e-1" is text in YAML 1.1; mergekit reads a number
    assert (emb.weights, emb.densities) == ((0.5,), (0.9,))  # no filter matched -> top level
    assert (head.normalize, mlp.normalize, mlp.rescale) == (True, False, True)


@pytest.mark.parametrize("change,key", [
    ({"slices": [{"sources": []}]}, "slices"),
    ({"modules": {"text": {}}}, "modules"),
    ({"tokenizer": {"source": "union"}}, "tokenizer"),
    ({"tokenizer_source": "union"}, "tokenizer_source"),
    ({"chat_template": "chatml"}, "chat_template"),
    ({"merge_method": "slerp"}, "merge_method"),
    ({"merge_method": "breadcrumbs"}, "merge_method"),
    ({"name": "my-merge"}, "name"),
    ({"dtype": "float64"}, "dtype"),
    ({"base_model": None}, "base_model"),
    ({"base_model": "org/base+org/lora"}, "base_model"),
    ({"parameters": {"epsilon": 0.1}}, "parameters.epsilon"),
    ({"parameters": {"density": [0.1, 0.5, 0.9]}}, "parameters.density"),
    ({"parameters": {"weight": [{"filter": "mlp", "value": [0, 1]}]}}, "parameters.weight[0].value"),
    ({"parameters": {"lambda": "big"}}, "parameters.lambda"),
    ({"parameters": {"normalize": "maybe"}}, "parameters.normalize"),
])
def test_unsupported_keys_are_errors_naming_the_key(change, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        from_mergekit({**BASIC, **change})


@pytest.mark.parametrize("models,key", [
    ([{"model": "a", "parameters": {"density": 0.5}}], r"models\[0\].parameters.weight"),
    ([{"model": "a", "parameters": {"weight": 1, "normalize": True}}],
     r"models\[0\].parameters.normalize"),
    ([{"model": "a", "parameters": {"weight": 1, "gamma": 0.1}}], r"models\[0\].parameters.gamma"),
    ([{"model": "a", "parameters": {"weight": 1}, "layer_range": [0, 2]}],
     r"models\[0\].layer_range"),
    ([{"model": "a@main", "parameters": {"weight": 1}}], r"models\[0\].model"),
    ([{"model": {"model": {"path": "a", "revision": "x"}}, "parameters": {"weight": 1}}],
     r"models\[0\].model.model.revision"),
    ([{"model": "a", "parameters": {"weight": 1}}, {"model": "a", "parameters": {"weight": 1}}],
     r"models\[1\].model"),
    ([{"model": "org/base"}], "models: no model besides"),
])
def test_model_entry_errors(models, key):
    with pytest.raises(ConfigError, match=key):
        from_mergekit({"merge_method": "task_arithmetic", "base_model": "org/base",
                       "models": models})


def test_density_out_of_range_names_model_and_tensor():
    plan = parse_classic_section("ties", "b", [{"model": "a", "parameters": {
        "weight": 1, "density": [{"filter": "mlp", "value": 1.5}, {"value": 0.5}]}}], None)
    assert plan.tensor_params("x.attn").densities == (0.5,)
    with pytest.raises(ConfigError, match=r"models\[0\].parameters.density = 1.5 .*'x.mlp'"):
        plan.tensor_params("x.mlp")


def test_accepted_mergekit_spellings():
    raw = {"merge_method": "dare_linear", "base_model": {"model": {"path": "b"}},
           "models": [{"model": {"model": "a"}, "parameters": {"weight": "0.5"}}],
           "tokenizer_source": "base", "dtype": "torch.bfloat16", "slices": None,
           "parameters": {"rescale": 0, "int8_mask": "true"}}
    native = from_mergekit(raw)
    assert native["backbone"] == "b" and native["models"][0]["model"] == "a"
    plan = parse_classic_section("dare_linear", "b", native["models"], native["parameters"])
    p = plan.tensor_params("w")
    assert (p.weights, p.rescale, p.normalize) == ((0.5,), False, False)


def test_cli_merges_a_mergekit_yaml_as_is(tmp_path, monkeypatch, capsys):
    m, tok = make_tiny_model(0, dtype=torch.bfloat16)
    save_model_dir(m, tok, tmp_path / "base", max_shard_size="40KB")
    save_model_dir(perturbed_copy(m, 0.02, seed=1), tok, tmp_path / "ft", max_shard_size="40KB")
    capsys.readouterr()
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": "./base",
        "models": [{"model": "./base"}, {"model": "./ft", "parameters": {"weight": 0.5}}],
        "dtype": "float32"}))
    monkeypatch.chdir(tmp_path)  # mergekit resolves relative paths against the cwd
    assert main(["merge", "cfg.yml", "out", "--no-progress"]) == 0
    out, base, ft = load_dir(tmp_path / "out"), load_dir(tmp_path / "base"), load_dir(tmp_path / "ft")
    name = "model.layers.0.mlp.up_proj.weight"
    b = base[name].float()
    assert out[name].dtype == torch.float32
    assert torch.equal(out[name], (ft[name].float() - b) * 0.5 + b)
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()

    (tmp_path / "bad.yml").write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": "./base",
        "slices": [{"sources": [{"model": "./ft", "layer_range": [0, 2]}]}]}))
    capsys.readouterr()
    assert main(["merge", "bad.yml", "out2", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "slices" in err[0]
    assert not (tmp_path / "out2").exists()
