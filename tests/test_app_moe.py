"""The mixture of experts in the app (issue 16): "moe (mixture of experts)" is a choice of the
Recipe tab's method dropdown with its own form (`app.moe_form`: base, experts, prompts per
expert, gate_mode, experts_per_token, dtype, the shared expert of Qwen2 bases) that gives
mergekit-moe's YAML; the Merge tab builds it in the background through the engine's
`build_moe`, and the result equals `build_moe` of the same config; it is recorded in the
history, compared, exported with its config made portable, and built again. A bad config is
one line (beside the YAML editor with its line, under the method, as the merge's failure), and
a cancelled build leaves nothing."""

from __future__ import annotations

import json
import threading
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from _app_helpers import client, find, poll
from _moe_helpers import family

pytest_plugins = ("_app_helpers",)

PROMPTS = {"e0": ["python code", "def return"], "e1": ["once upon time", "story king"], "e2": ["sum plus number"]}


@pytest.fixture(scope="module")
def experts(app_server) -> dict[str, Path]:
    """A tiny Llama base with a tokenizer and three experts (MLPs changed), in the app's work dir."""
    _, ctx = app_server
    return family(ctx.workspace.root / "moe-llama", "llama")


@pytest.fixture(scope="module")
def qwen(app_server) -> dict[str, Path]:
    _, ctx = app_server
    return family(ctx.workspace.root / "moe-qwen", "qwen2", experts=2)


@pytest.fixture(scope="module")
def qwen_state(qwen):
    from app import state as st

    s = st.new_session()
    for name, path in qwen.items():
        s = st.add_model(s, str(path), path, name=name)
    return s


def config_dict(fam: dict[str, Path], **extra) -> dict:
    return {"base_model": str(fam["base"]), "dtype": "float32", "experts_per_token": 2, "gate_mode": "hidden",
            "experts": [{"source_model": str(fam[n]), "positive_prompts": p} for n, p in PROMPTS.items()], **extra}


def loaded(c, fam: dict[str, Path]) -> None:
    for name in ("base", "e0", "e1", "e2"):
        out = c.predict(str(fam[name]), api_name="/add_model")
        assert "Added" in str(out) or "already loaded" in str(out), out


def poll_build(c, timeout: float = 120):
    return poll(lambda: c.predict(api_name="/poll_merge"),
                lambda out: any(w in str(out[2]) for w in ("Built", "Failed", "Cancelled")), timeout, 0.2, "moe build")


def yaml_out(out) -> str:
    return find(out, lambda o: isinstance(o, str) and o.startswith("base_model:"))


def test_form_fields_prompts_and_config(app_server, experts, qwen_state):
    from app import moe_form
    from app import state as st
    from mergecore.errors import MergeError

    assert moe_form.text_prompts("a\n\n  \nb\\nc\nd\\\\n") == ["a", "b\nc", "d\\n"]
    for prompts in (["def f():\n    return 1", "C:\\new", "plain"], []):
        assert moe_form.text_prompts(moe_form.prompts_text(prompts)) == prompts
    s = st.new_session()
    for name, path in experts.items():
        s = st.add_model(s, str(path), path, name=name)
    form = moe_form.switch({"method": "ties"}, s, True)
    moe = form["moe"]
    assert (moe["base"], moe["experts"], moe["experts_per_token"], moe["shared"]) == ("base", ["e0", "e1", "e2"], 2,
                                                                                       None)
    form = moe_form.set_field(form, s, "experts", ["e2", "e0"])
    assert form["moe"]["experts"] == ["e0", "e2"]  # the order they had; a new one goes last
    form = moe_form.set_field(form, s, "experts", ["e0", "e1", "e2"])
    assert form["moe"]["experts"] == ["e0", "e2", "e1"]
    for name, prompts in PROMPTS.items():
        form = moe_form.set_field(form, s, f"positive@{name}", "\n".join(prompts))
    form = moe_form.set_field(form, s, "negative@e1", "def return\n")
    form = moe_form.set_field(form, s, "experts_per_token", " 1 ")
    form = moe_form.set_field(form, s, "dtype", "bfloat16")
    for key, raw, msg in (("experts_per_token", "1.5", "whole number"), ("experts_per_token", "0", "at least 1"),
                          ("gate_mode", "magic", "not one of hidden, cheap_embed, random"),
                          ("base", "nope", "not a model of this session"), ("dtype", "int8", "not one of"),
                          ("size", "1", "not a field")):
        with pytest.raises(MergeError, match=msg):
            moe_form.set_field(form, s, key, raw)
    config = moe_form.build_config(form, s)
    assert [e.source_model for e in config.experts] == [str(experts[n]) for n in ("e0", "e2", "e1")]
    assert config.experts[2].negative_prompts == ["def return"] and config.experts_per_token == 1
    assert config.dtype == "bfloat16" and config.shared_experts is None
    text, status = moe_form.views(form, s)
    assert yaml.safe_load(text)["experts"][0]["positive_prompts"] == PROMPTS["e0"] and "Mixture of 3 experts" in status
    form = moe_form.set_field(form, s, "positive@e2", "  \n")  # hidden gates with no prompt: the engine's one line
    text, status = moe_form.views(form, s)
    assert "experts.1" in status and "has no positive_prompts" in status and "\n" not in status
    assert "source_model" in text  # the YAML as it stands
    assert moe_form.switch(form, s, False)["moe"]["experts"] == ["e0", "e2", "e1"]  # kept, off

    # a Qwen2 base: the shared expert is offered, the base by default, with prompts of its own
    qform = moe_form.switch({"method": "ties"}, qwen_state, True)
    assert moe_form.shared_offered(qform["moe"], qwen_state) and qform["moe"]["shared"] == "base"
    for key, raw in (("positive@e0", "python"), ("positive@e1", "story"), ("positive@shared", "hello world")):
        qform = moe_form.set_field(qform, qwen_state, key, raw)
    config = moe_form.build_config(qform, qwen_state)
    assert config.shared_experts[0].positive_prompts == ["hello world"]
    qform = moe_form.set_field(qform, qwen_state, "shared", "none")
    assert "shared_experts" not in moe_form.config_dict(qform, qwen_state)


def test_client_builds_a_mixture_equal_to_build_moe(app_server, experts, tmp_path):
    from mergecore.moe.build import CONFIG_FILE, build_moe
    from mergecore.moe.config import moe_config_from_dict

    url, ctx = app_server
    c = client(url)
    loaded(c, experts)
    out = c.predict("moe", api_name="/set_method")
    assert "moe" in out and "experts:" in yaml_out(out)
    assert any("has no positive_prompts" in str(o) for o in out)  # a new form: the engine says what is missing

    data = config_dict(experts)
    out = c.predict(yaml.safe_dump(data, sort_keys=False), api_name="/import_yaml")
    assert out[-1].startswith("**Applied**: moe of base, e0, e1, e2."), out[-1]
    assert "positive_prompts:" in yaml_out(out) and "Mixture of 3 experts" in str(out)
    assert "moe: 3 experts (2 per token), hidden gates" in str(c.predict(api_name="/plan"))
    assert "Saved the config as **my moe**" in c.predict("my moe", api_name="/save_recipe")[0]

    out = c.predict("mix", api_name="/merge")
    assert "Building the mixture of experts into" in out[2], out
    out = poll_build(c)
    assert "**Built** the mixture of experts" in out[2] and "MixtralForCausalLM" in out[2], out[2]
    job = next(j for j in list(ctx.jobs._jobs.values()) if j.meta.get("moe") and j.status == "done"
               and f"`{j.result.out_dir}`" in out[2])
    got = Path(job.result.out_dir)
    events = ctx.jobs.snapshot(job.owner, job.id)["events"]
    assert {e["data"]["stage"] for e in events} == {"gates", "writing"} and events[-1]["data"]["fraction"] == 1.0
    assert "gates: 5/5 prompts" in out[1] and "writing:" in out[1]  # the log

    ref = build_moe(moe_config_from_dict(data), tmp_path / "ref")  # the engine on the same config
    a, b = load_file(got / "model.safetensors"), load_file(ref.out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((got / "config.json").read_text()) == json.loads((ref.out / "config.json").read_text())
    assert yaml.safe_load((got / CONFIG_FILE).read_text()) == yaml.safe_load((ref.out / CONFIG_FILE).read_text())

    # in the history (method moe), on Compare, exported with its config portable, built again
    rows = out[8]["value"]["data"] if "value" in out[8] else out[8]["data"]
    assert rows[0][:2] == ["mix", "done"] and rows[0][3] == "moe"
    status, html, table = c.predict(["base", "mix"], "python code", 2, None, "each model's own", None, "", "",
                                    api_name="/compare")
    assert "**mix**" in status and html.count('class="cmp-card"') == 2
    md, config_dl, zip_dl = c.predict("mix", api_name="/export")
    assert "Mixture of experts `mix` zipped" in md and "models/e0" in md, md
    with zipfile.ZipFile(zip_dl["value"] if isinstance(zip_dl, dict) and "value" in zip_dl else zip_dl) as z:
        shipped = yaml.safe_load(z.read(f"mix/{CONFIG_FILE}"))
        assert shipped["base_model"] == "models/base" and shipped["experts"][2]["source_model"] == "models/e2"
        assert "mix/model.safetensors" in z.namelist()
    rec_id = next(v for _, v in out[9]["choices"])
    out = c.predict(rec_id, api_name="/history_merge_again")
    assert "`mix`'s config again into `mix-2`" in out[-1], out[-1]
    out = poll(lambda: c.predict(api_name="/poll_merge"), lambda o: "Built" in str(o[2]) and "mix-2" in str(o[2]),
               120, 0.2, "built again")
    again = load_file(got.parent / "mix-2" / "model.safetensors")
    assert all(torch.equal(again[k], a[k]) for k in a)
    out = c.predict(rec_id, api_name="/history_reopen")  # its config back in the form
    assert "Loaded the recipe of `mix`" in out[-1] and "positive_prompts:" in yaml_out(out), out[-1]
    out = c.predict(rec_id, api_name="/history_delete")
    assert out[0].startswith("Deleted `mix`") and not got.exists()
    out = c.predict("ties", api_name="/set_method")  # back to a method; the saved config brings the mixture back
    assert "merge_method: ties" in str(out)
    out = c.predict("my moe", api_name="/load_recipe")
    assert "saved recipe **my moe**" in out[-1] and "- def return" in yaml_out(out), out[-1]


def test_client_bad_configs_are_one_line_and_cancel_leaves_nothing(app_server, experts, monkeypatch):
    import mergecore.moe.build as build

    url, ctx = app_server
    c = client(url)
    loaded(c, experts)
    c.predict("moe", api_name="/set_method")
    bad = config_dict(experts)
    bad["experts"][1]["positive_prompts"] = ["story", " "]
    out = c.predict(yaml.safe_dump(bad, sort_keys=False), api_name="/import_yaml")
    assert out[-1].startswith("**Error:**") and "\n" not in out[-1], out[-1]
    assert "line 11, column 3: experts.1.positive_prompts: prompt 1 is empty" in out[-1], out[-1]
    bad["experts"][1]["positive_prompts"] = []
    out = c.predict(yaml.safe_dump(bad, sort_keys=False), api_name="/import_yaml")
    assert "line 10, column 3: experts.1 (" in out[-1] and "has no positive_prompts" in out[-1], out[-1]
    assert "\n" not in out[-1]

    out = c.predict("none", api_name="/merge")  # the form as it is: its experts have no prompts yet
    assert out[2].startswith("**Failed:**") and "has no positive_prompts" in out[2] and "\n" not in out[2], out[2]

    c.predict(yaml.safe_dump(config_dict(experts), sort_keys=False), api_name="/import_yaml")
    gate, real = threading.Event(), build.build_moe

    def gated(*args, **kwargs):
        assert gate.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "build_moe", gated)
    out = c.predict("stopped", api_name="/merge")
    assert "Building the mixture of experts into" in out[2]
    assert "Cancelling `stopped`" in c.predict(api_name="/cancel_merge")
    gate.set()
    out = poll_build(c)
    assert out[2] == "Cancelled; nothing was written."
    owner = next(j.owner for j in ctx.jobs._jobs.values() if j.meta.get("name") == "stopped")
    assert not (ctx.workspace.merges_dir(owner) / "stopped").exists()


def test_client_builds_a_qwen2_moe_with_its_shared_expert(app_server, qwen, tmp_path):
    """A Qwen2 base: the form offers the shared expert (the base by default), and the build equals
    `build_moe` of the form's config."""
    from mergecore.moe.build import build_moe
    from mergecore.moe.config import parse_moe_config

    url, ctx = app_server
    c = client(url)
    for name in ("base", "e0", "e1"):
        c.predict(str(qwen[name]), api_name="/add_model")
    out = c.predict("moe", api_name="/set_method")
    assert f"shared_experts:\n- source_model: {qwen['base']}" in yaml_out(out)
    assert any("has no positive_prompts" in str(o) for o in out)
    data = yaml.safe_load(yaml_out(out))
    for e, prompts in zip(data["experts"] + data["shared_experts"], (["python code"], ["once upon"], ["hello"])):
        e["positive_prompts"] = prompts
    out = c.predict(yaml.safe_dump(data, sort_keys=False), api_name="/import_yaml")
    assert out[-1].startswith("**Applied**: moe of base, e0, e1."), out[-1]
    assert "+ shared expert `base`" in str(out)
    c.predict("qmix", api_name="/merge")
    out = poll_build(c)
    assert "Qwen2MoeForCausalLM" in out[2], out[2]
    got = Path(next(j for j in list(ctx.jobs._jobs.values()) if j.meta.get("name") == "qmix").result.out_dir)
    ref = build_moe(parse_moe_config(yaml.safe_dump(data)), tmp_path / "ref")
    a, b = load_file(got / "model.safetensors"), load_file(ref.out / "model.safetensors")
    assert "model.layers.0.mlp.shared_expert_gate.weight" in a
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
