"""Files read from the data root are checked before use: adapter configs and weights that are malformed,
non-finite or not safetensors answer 400 naming `path` (the engine keeps serving, no slot is taken), files
reached through symlinks must stay under the data root, and datasets with invalid text are refused by line."""
from __future__ import annotations

import io
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from api_app import AUTH, api_client, assert_openai_error, write_lora
from coserve.engine.model.loader import load_model
from coserve.engine.paths import PathError


@pytest.fixture(scope="module")
def env(llama_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("files")
    data = base / "data"
    write_lora(llama_dir, data / "good")
    write_lora(llama_dir, base / "outside")        # a valid adapter outside the data root
    with api_client(llama_dir, data) as client:
        yield client, data, base / "outside"


def variant(data, name: str):
    """A copy of the good adapter to break."""
    target = data / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(data / "good", target)
    return target


def load(client, name: str):
    return client.put(f"/admin/adapters/{name}", json={"path": name}, headers=AUTH)


def set_config(folder, text: str) -> None:
    (folder / "adapter_config.json").write_text(text)


def config_with(folder, **keys) -> str:
    return json.dumps({**json.loads((folder / "adapter_config.json").read_text()), **keys})


@pytest.mark.parametrize("case, fragment", [
    ("list", "JSON object"),
    ("rank-string", "r must be a positive integer"),
    ("rank-float", "r must be a positive integer"),
    ("rank-negative", "r must be a positive integer"),
    ("rank-bool", "r must be a positive integer"),
    ("alpha-string", "lora_alpha must be a finite number"),
    ("alpha-nan", "not a number"),
    ("alpha-overflow", "lora_alpha must be a finite number"),
    ("alpha-huge-scaling", "in magnitude"),
    ("rslora-string", "use_rslora"),
    ("not-json", "not valid JSON"),
    ("not-utf8", "not valid JSON"),
])
def test_bad_adapter_configs_answer_400(env, case, fragment):
    client, data, _ = env
    folder = variant(data, f"cfg-{case}")
    texts = {
        "list": "[1, 2]",
        "rank-string": config_with(folder, r="4"),
        "rank-float": config_with(folder, r=4.0),
        "rank-negative": config_with(folder, r=-4),
        "rank-bool": config_with(folder, r=True),
        "alpha-string": config_with(folder, lora_alpha="big"),
        "alpha-nan": config_with(folder).replace('"lora_alpha": 8.0', '"lora_alpha": NaN'),
        "alpha-overflow": config_with(folder).replace('"lora_alpha": 8.0', '"lora_alpha": 1e999'),
        "alpha-huge-scaling": config_with(folder, lora_alpha=1.7e308, use_rslora=True, r=4),
        "rslora-string": config_with(folder, use_rslora="yes"),
        "not-json": "{r: 4",
    }
    if case == "not-utf8":
        (folder / "adapter_config.json").write_bytes(b'{"r": 4, "x": "\xff"}')
    else:
        set_config(folder, texts[case])
    free = client.get("/admin/capacity", headers=AUTH).json()["adapter_slots_free"]
    err = assert_openai_error(load(client, folder.name), 400, "path")
    assert fragment in err["message"], err
    assert client.get("/admin/capacity", headers=AUTH).json()["adapter_slots_free"] == free
    assert client.get("/health").status_code == 200


def _pickle_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"a": torch.ones(2)}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("case, fragment", [
    ("empty", "not a valid safetensors file"),
    ("truncated", "not a valid safetensors file"),
    ("pickle", "not a valid safetensors file"),
    ("nan", "non-finite"),
    ("inf", "non-finite"),
    ("int-dtype", "floating-point"),
    ("no-tensors", "no LoRA tensors"),
])
def test_bad_adapter_weights_answer_400(env, case, fragment):
    client, data, _ = env
    folder = variant(data, f"w-{case}")
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(tensors)[0]
    if case == "empty":
        weights.write_bytes(b"")
    elif case == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif case == "pickle":
        weights.write_bytes(_pickle_bytes())
    elif case == "no-tensors":
        save_file({}, str(weights))
    else:
        bad = {"nan": float("nan"), "inf": float("inf")}
        tensors[key] = (tensors[key].to(torch.int32) if case == "int-dtype"
                        else tensors[key].index_fill(1, torch.tensor([0]), bad[case]))
        save_file(tensors, str(weights))
    err = assert_openai_error(load(client, folder.name), 400, "path")
    assert fragment in err["message"], err
    assert str(data) not in err["message"]


def test_symlinks_may_not_leave_the_data_root(env):
    client, data, outside = env
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        folder = variant(data, f"link-{name.split('.')[0]}")
        (folder / name).unlink()
        (folder / name).symlink_to(outside / name)
        err = assert_openai_error(load(client, folder.name), 400, "path")
        assert "outside the data root" in err["message"] and str(outside) not in err["message"]
    inside = variant(data, "link-inside")
    (inside / "adapter_model.safetensors").unlink()
    (inside / "adapter_model.safetensors").symlink_to(data / "good" / "adapter_model.safetensors")
    assert load(client, inside.name).status_code == 200, "a link that stays under the root is fine"
    (data / "escape").symlink_to(outside, target_is_directory=True)
    assert_openai_error(load(client, "escape"), 400, "path")


def test_init_from_a_bad_adapter_and_bad_dataset_text_answer_400(env):
    client, data, _ = env
    folder = variant(data, "init-bad")
    set_config(folder, config_with(folder, r="4"))
    (data / "task.jsonl").write_text('{"text": "fine"}\n')
    job = {"id": "j", "dataset": {"path": "task.jsonl"}, "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
           "output": "out/j", "init_from": "init-bad"}
    err = assert_openai_error(client.post("/admin/finetune/jobs", json=job, headers=AUTH), 400, "init_from")
    assert "positive integer" in err["message"]
    (data / "utf8.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "bad \xff byte"}\n')
    (data / "surrogate.jsonl").write_text('{"text": "fine"}\n{"text": "x"}\n{"text": "\\ud800"}\n')
    for name, line in (("utf8.jsonl", "line 2"), ("surrogate.jsonl", "line 3")):
        body = {**job, "init_from": None, "dataset": {"path": name}}
        err = assert_openai_error(client.post("/admin/finetune/jobs", json=body, headers=AUTH), 400, "dataset.path")
        assert line in err["message"], err


def test_model_files_are_checked(llama_dir, tmp_path):
    root = tmp_path / "root"
    model = root / "model"
    shutil.copytree(llama_dir, model)
    weights = model / "model.safetensors"
    outside = tmp_path / "weights.safetensors"
    shutil.move(weights, outside)
    weights.symlink_to(outside)
    with pytest.raises(PathError, match="outside the data root"):
        load_model(model, data_root=root)
    load_model(model)   # a model folder outside the data root is the operator's choice
    weights.unlink()
    weights.write_bytes(outside.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors is not a valid safetensors file"):
        load_model(model)
