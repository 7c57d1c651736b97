"""models.yaml: the packaged registry, strict validation, the user's overrides, `--model` resolution."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from unittest.mock import patch

import pytest

from kgen_cli.download import resolve_model
from kgen_cli.errors import ModelNotFoundError, RegistryError, UsageError
from kgen_cli.registry import (
    LOCAL_QUANT_TYPES,
    ModelSpec,
    family_note,
    load_registry,
    packaged_registry,
    registry_spec_only,
)

GOOD_ENTRY = """\
- name: tipo-x
  family: tipo
  repo: someone/TIPO-X-GGUF
  file: tipo-x.Q8_0.gguf
  quant: Q8_0
  context_length: 1024
"""


def write_user_registry(home: Path, text: str) -> Path:
    path = home / "models.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def user_entry(**changes: object) -> str:
    """GOOD_ENTRY as a user models.yaml, with keys changed, added or (value None) removed."""
    lines: list[str | None] = list(GOOD_ENTRY.splitlines())
    keys = {line.strip("- ").split(":")[0]: i for i, line in enumerate(lines)}
    for key, value in changes.items():
        if key in keys:
            lines[keys[key]] = None if value is None else f"{lines[keys[key]][:2]}{key}: {value}"
        elif value is not None:
            lines.append(f"  {key}: {value}")
    return "models:\n" + "\n".join(line for line in lines if line is not None) + "\n"


# --- the packaged registry ----------------------------------------------------------------------


def test_packaged_registry_is_the_repository_root_file_in_a_source_checkout():
    where, text = packaged_registry()
    assert Path(where) == Path(__file__).resolve().parent.parent / "models.yaml"
    assert "default:" in text


def test_packaged_registry_inside_an_installed_package_wins(tmp_path):
    """As in the wheel (pyproject force-includes models.yaml as kgen_cli/models.yaml)."""
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    package = tmp_path / "site" / "kgen_cli"
    package.mkdir(parents=True)
    for module in ("__init__.py", "errors.py", "families.py", "paths.py", "quant.py", "registry.py", "sampling.py"):
        shutil.copy(root / "kgen_cli" / module, package / module)
    shutil.copy(root / "models.yaml", package / "models.yaml")
    code = "from kgen_cli.registry import packaged_registry, load_registry; print(packaged_registry()[0]); print(len(load_registry()))"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    assert out.stdout.split() == [str(package / "models.yaml"), "33"]


def test_packaged_registry_loads_every_model_of_peers_section_7():
    registry = load_registry()
    names = [spec.name for spec in registry]
    assert len(names) == len(set(names)) == 33
    dtg = [spec for spec in registry if spec.family == "dtg"]
    assert len(dtg) == 15  # 5 repos x Q6_K/Q8_0/f16
    assert {spec.file for spec in dtg} == {"ggml-model-Q6_K.gguf", "ggml-model-Q8_0.gguf", "ggml-model-f16.gguf"}
    official_tipo = [spec for spec in registry if spec.repo.startswith("KBlueLeaf/TIPO")]
    assert [spec.file for spec in official_tipo] == [
        "TIPO-v2.1-1B-A200M-f16.gguf",
        "TIPOv2-1B-A200M-f16.gguf",
        "TIPO-500M-ft-F16.gguf",
        "TIPO-200M-ft2-F16.gguf",
        "TIPO-200M-ft-F16.gguf",
        "TIPO-500M_epoch5-F16.gguf",
        "TIPO-200M-40Btok-F16.gguf",
        "TIPO-100M-F16.gguf",
    ]
    assert all(spec.quant == "F16" for spec in official_tipo)
    for spec in registry:
        assert spec.name == spec.name.lower()
        assert spec.quality_line == (spec.repo in ("KBlueLeaf/DanTagGen-delta", "KBlueLeaf/DanTagGen-delta-rev2"))
        if spec.repo.split("/")[0] in ("DevQuasar", "QuantFactory", "mav23"):
            assert spec.base == "tipo-500m" and spec.quant != "F16"


def test_default_is_the_verified_quantised_tipo_500m():
    registry = load_registry()
    default = registry.default_spec
    assert registry.default == default.name == "tipo-500m-q8_0"
    assert (default.family, default.quant) == ("tipo", "Q8_0")
    assert default.repo == "DevQuasar/KBlueLeaf.TIPO-500M-GGUF"
    assert default.size == 540_629_120
    assert default.sha256 == "f8882cda2dde30069ea77975876acd6d024a5787a71bbc6ea4a3fa1fd8df2860"
    assert default.n_ctx == 1024


# --- strict validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"famly": "tipo"}, "entry 'tipo-x': unknown key 'famly' (did you mean 'family'?)"),
        ({"family": None}, "entry 'tipo-x': missing key 'family'"),
        ({"repo": None}, "entry 'tipo-x': missing key 'repo'"),
        ({"context_length": None}, "entry 'tipo-x': missing key 'context_length'"),
        ({"family": "dart"}, "entry 'tipo-x': 'family' must be one of tipo, dtg, not 'dart'"),
        ({"context_length": '"1024"'}, "entry 'tipo-x': 'context_length' must be an integer, not a string"),
        ({"context_length": 0}, "entry 'tipo-x': 'context_length' must be positive"),
        ({"size": "true"}, "entry 'tipo-x': 'size' must be an integer, not a boolean"),
        ({"size": "1.5"}, "entry 'tipo-x': 'size' must be an integer, not a number"),
        ({"quality_line": "1"}, "entry 'tipo-x': 'quality_line' must be true or false, not an integer"),
        ({"quality_line": "true"}, "entry 'tipo-x': 'quality_line' applies to dtg models only"),
        ({"sha256": "abc123"}, "entry 'tipo-x': 'sha256' must be 64 hexadecimal digits"),
        ({"sha256": "g" * 64}, "entry 'tipo-x': 'sha256' must be 64 hexadecimal digits"),
        ({"description": "[a, b]"}, "entry 'tipo-x': 'description' must be a string, not a list"),
        ({"repo": "no-owner"}, "entry 'tipo-x': 'repo' must look like owner/name"),
        ({"file": "tipo-x.bin"}, "entry 'tipo-x': 'file' must be a .gguf file"),
        ({"quant": "q8_0"}, "entry 'tipo-x': 'quant' must be an upper-case llama.cpp type"),
        ({"name": "Tipo-X"}, "entry 'Tipo-X': 'name' must be lower-case"),
        ({"name": "tipo@x"}, "entry 'tipo@x': 'name' must be lower-case"),
        ({"base": "tipo-5000m"}, "entry 'tipo-x': base 'tipo-5000m' is not a registry model (did you mean"),
    ],
)
def test_bad_entry_is_a_registry_error_naming_file_and_entry(isolated_home, changes, message):
    path = write_user_registry(isolated_home, user_entry(**changes))
    with pytest.raises(RegistryError) as info:
        load_registry()
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)
    assert info.value.exit_code == 2


def test_the_example_message_of_the_brief(isolated_home):
    write_user_registry(isolated_home, user_entry(family=None, famly="tipo"))
    with pytest.raises(RegistryError, match=r"models\.yaml: entry 'tipo-x': unknown key 'famly'"):
        load_registry()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models:\n" + GOOD_ENTRY + GOOD_ENTRY, "entry 'tipo-x': duplicate name"),
        ("models:\n- just a string\n", "entry #1: expected a mapping of keys"),
        ("models:\n- {family: tipo}\n", "entry #1: missing key 'name'"),
        ("models: {name: x}\n", "'models' must be a list of entries"),
        ("- a\n- b\n", "expected a mapping with 'default' and 'models'"),
        ("defualt: tipo-100m\n", "unknown top-level key 'defualt' (did you mean 'default'?)"),
        ("default: tipo-1000m\n", "default 'tipo-1000m' is not a registry model (did you mean 'tipo-100m'?)"),
        ("default: [a]\n", "'default' must be a model name"),
        ("models:\n  - name: [unclosed\n", "invalid YAML (line"),
    ],
)
def test_bad_file_is_a_registry_error(isolated_home, text, message):
    path = write_user_registry(isolated_home, text)
    with pytest.raises(RegistryError) as info:
        load_registry()
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_packaged_file_is_validated_too(isolated_home, tmp_path):
    broken = tmp_path / "models.yaml"
    broken.write_text("default: x\nmodels:\n" + GOOD_ENTRY.replace("family: tipo", "family: nope"))
    with patch("kgen_cli.registry.packaged_registry", return_value=(str(broken), broken.read_text())):
        with pytest.raises(RegistryError, match=r"models\.yaml: entry 'tipo-x': 'family' must be one of"):
            load_registry()


def test_empty_user_file_changes_nothing(isolated_home):
    write_user_registry(isolated_home, "")
    assert load_registry().default == "tipo-500m-q8_0"


# --- the user's models.yaml ---------------------------------------------------------------------


def test_user_file_adds_a_model_and_sets_the_default(isolated_home):
    write_user_registry(isolated_home, "default: tipo-x\n" + user_entry(size=123, sha256="AB" * 32))
    registry = load_registry()
    spec = registry.get("tipo-x")
    assert spec == ModelSpec(
        name="tipo-x",
        family="tipo",
        repo="someone/TIPO-X-GGUF",
        file="tipo-x.Q8_0.gguf",
        quant="Q8_0",
        context_length=1024,
        size=123,
        sha256="ab" * 32,  # normalised to lower case
    )
    assert registry.default_spec is spec
    assert list(registry)[-1] is spec  # added after the packaged entries
    assert len(registry.sources) == 2


def test_user_entry_replaces_the_packaged_one_by_name(isolated_home):
    write_user_registry(
        isolated_home,
        """\
        models:
          - name: tipo-500m-q8_0
            family: tipo
            repo: me/mirror
            file: mirror.gguf
            quant: Q8_0
            context_length: 4096
        """,
    )
    registry = load_registry()
    spec = registry.get("tipo-500m-q8_0")
    assert (spec.repo, spec.file, spec.sha256, spec.size) == ("me/mirror", "mirror.gguf", None, None)
    assert spec.n_ctx == 2048  # min(context_length, 2048)
    assert len(registry) == 33
    assert registry.default_spec is spec


def test_unknown_name_suggests_the_closest_and_points_to_the_list():
    with pytest.raises(ModelNotFoundError) as info:
        load_registry().get("tipo-500m-f")
    assert str(info.value) == "unknown model 'tipo-500m-f' (did you mean 'tipo-500m-ft'?)"
    assert "kgen models list" in info.value.hint
    assert info.value.exit_code == 1


# --- NAME@QTYPE ---------------------------------------------------------------------------------


def test_local_quant_variant_of_an_f16_model():
    registry = load_registry()
    spec = registry.get("tipo-500m-ft@q8_0")
    source = registry.get("tipo-500m-ft")
    assert spec.name == "tipo-500m-ft@Q8_0"
    assert (spec.quant, spec.base, spec.source) == ("Q8_0", "tipo-500m-ft", source)
    assert (spec.repo, spec.file) == (source.repo, source.file)  # what is fetched
    assert spec.is_local_quant and not source.is_local_quant
    assert registry.get("dtg-delta-f16@Q4_K_M").quality_line


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("tipo-500m-ft@Q9_9", "unknown quantisation type 'Q9_9'"),
        ("tipo-500m-ft@F16", "unknown quantisation type 'F16'"),
        ("tipo-500m-q8_0@Q4_K_M", "'tipo-500m-q8_0' is already quantised (Q8_0)"),
        ("dtg-beta-q6_k@Q4_0", "'dtg-beta-q6_k' is already quantised (Q6_K)"),
    ],
)
def test_bad_local_quant_is_a_usage_error(name, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_registry().get(name)


def test_unknown_source_of_a_local_quant_is_not_found():
    with pytest.raises(ModelNotFoundError, match="unknown model 'tipo-9m'"):
        load_registry().get("tipo-9m@Q8_0")


def test_every_local_quant_type_is_accepted():
    registry = load_registry()
    for qtype in LOCAL_QUANT_TYPES:
        assert registry.get(f"tipo-100m@{qtype.lower()}").quant == qtype


# --- resolve_model / registry_spec_only ---------------------------------------------------------


def _no_hub_cache(**kwargs):
    return None


def test_resolve_default_not_downloaded_says_how_to_download():
    with patch("kgen_cli.download.try_to_load_from_cache", side_effect=_no_hub_cache):
        with pytest.raises(ModelNotFoundError) as info:
            resolve_model(None, None)
    assert str(info.value) == "model 'tipo-500m-q8_0' is not downloaded"
    assert info.value.hint == "run: kgen models download tipo-500m-q8_0"


def test_resolve_not_downloaded_offline_mentions_hf_hub_offline():
    with patch("kgen_cli.download.try_to_load_from_cache", side_effect=_no_hub_cache), \
         patch("huggingface_hub.constants.HF_HUB_OFFLINE", True):  # fmt: skip
        with pytest.raises(ModelNotFoundError) as info:
            resolve_model("dtg-beta-q8_0", None)
    assert info.value.hint == "HF_HUB_OFFLINE is set; unset it, then run: kgen models download dtg-beta-q8_0"


def test_resolve_registry_name_finds_the_cached_file(tmp_path):
    gguf = tmp_path / "ggml-model-Q6_K.gguf"
    gguf.write_bytes(b"GGUF")
    with patch("kgen_cli.download.try_to_load_from_cache", return_value=str(gguf)) as lookup:
        resolved = resolve_model("dtg-delta-rev2-q6_k", None)
    lookup.assert_called_once_with(repo_id="KBlueLeaf/DanTagGen-delta-rev2", filename="ggml-model-Q6_K.gguf",
                                   cache_dir=os.environ["HF_HUB_CACHE"])  # fmt: skip
    assert resolved.path == gguf
    assert (resolved.name, resolved.family, resolved.quality_line) == ("dtg-delta-rev2-q6_k", "dtg", True)
    assert resolved.spec == load_registry().get("dtg-delta-rev2-q6_k")
    assert (resolved.context_length, resolved.n_ctx) == (1024, 1024)


def test_family_option_overrides_a_registry_model(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with patch("kgen_cli.download.try_to_load_from_cache", return_value=str(gguf)):
        resolved = resolve_model("dtg-delta-q8_0", "TIPO")
    assert (resolved.family, resolved.quality_line) == ("tipo", False)


def test_download_missing_fetches_a_missing_model(tmp_path):
    gguf = tmp_path / "ggml-model-Q8_0.gguf"
    with patch("kgen_cli.download.try_to_load_from_cache", side_effect=_no_hub_cache), \
         patch("kgen_cli.download.download", return_value=gguf) as fetch:  # fmt: skip
        resolved = resolve_model("dtg-alpha-q8_0", None, download_missing=True)
    assert resolved.path == gguf
    assert fetch.call_args.args[0].name == "dtg-alpha-q8_0"


def test_download_missing_never_downloads_offline():
    with patch("kgen_cli.download.try_to_load_from_cache", side_effect=_no_hub_cache), \
         patch("kgen_cli.download.download", side_effect=AssertionError("downloaded")), \
         patch("huggingface_hub.constants.HF_HUB_OFFLINE", True):  # fmt: skip
        with pytest.raises(ModelNotFoundError, match="not downloaded"):
            resolve_model("dtg-alpha-q8_0", None, download_missing=True)


@pytest.mark.parametrize(
    ("file_name", "family", "quality_line"),
    [
        ("DanTagGen-delta-rev2_ggml-model-Q6_K.gguf", "dtg", True),
        ("DanTagGen-beta_ggml-model-f16.gguf", "dtg", False),
        ("my-dtg-finetune.gguf", "dtg", False),
        ("TIPO-500M-ft_TIPO-500M-ft-F16.gguf", "tipo", False),
        ("KBlueLeaf.TIPO-500M.Q8_0.gguf", "tipo", False),
    ],
)
def test_local_path_family_is_guessed_from_the_file_name(tmp_path, file_name, family, quality_line):
    gguf = tmp_path / file_name
    gguf.write_bytes(b"GGUF")
    resolved = resolve_model(str(gguf), None)
    assert (resolved.path, resolved.family, resolved.quality_line, resolved.spec) == (gguf, family, quality_line, None)
    assert resolved.n_ctx is resolved.context_length is None


def test_local_path_with_an_unknown_family_is_prompted_as_tipo_with_a_note(tmp_path):
    gguf = tmp_path / "smollm2.gguf"
    gguf.write_bytes(b"GGUF")
    assumed = resolve_model(str(gguf), None)
    assert (assumed.family, assumed.family_assumed, assumed.quality_line) == ("tipo", True, False)
    assert "smollm2.gguf" in family_note(assumed) and "--family dtg" in family_note(assumed)
    told = resolve_model(str(gguf), "dtg")
    assert (told.family, told.family_assumed, family_note(told)) == ("dtg", False, None)
    assert family_note(resolve_model(str(gguf), "tipo")) is None


def test_family_option_overrides_the_guess(tmp_path):
    gguf = tmp_path / "TIPO-200M.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf), "dtg").family == "dtg"


def test_relative_local_path_is_made_absolute(tmp_path, monkeypatch):
    (tmp_path / "tipo.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("tipo.gguf", None).path == tmp_path / "tipo.gguf"


def test_missing_local_file_is_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such model file"):
        resolve_model(str(tmp_path / "tipo-missing.gguf"), None)


def test_unknown_family_option_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="unknown family 'dart'"):
        resolve_model(None, "dart")


def test_spec_only_needs_neither_file_nor_cache(tmp_path):
    with patch("kgen_cli.download.try_to_load_from_cache", side_effect=AssertionError("no lookup")), \
         patch("kgen_cli.download.hf_hub_download", side_effect=AssertionError("no network")):  # fmt: skip
        default = registry_spec_only(None, None)
        dtg = registry_spec_only("dtg-delta-f16", None)
        local = registry_spec_only(str(tmp_path / "DanTagGen-delta_x.gguf"), None)
        quant = registry_spec_only("tipo-500m-ft@Q6_K", None)
    assert (default.name, default.path, default.family) == ("tipo-500m-q8_0", None, "tipo")
    assert (dtg.family, dtg.quality_line, dtg.path) == ("dtg", True, None)
    assert (local.family, local.quality_line, local.spec) == ("dtg", True, None)
    assert (quant.name, quant.family) == ("tipo-500m-ft@Q6_K", "tipo")


def test_spec_only_still_rejects_unknown_names():
    with pytest.raises(ModelNotFoundError):
        registry_spec_only("nope", None)
