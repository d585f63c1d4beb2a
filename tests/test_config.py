"""The configuration: defaults that work, environment overrides, and one precise line per
problem (key path, bad value, what is allowed, where it came from)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from config import ConfigError, Settings, default_config_path, load_settings
from config.settings import RouteMatch, SeriesRule


def _write(tmp_path: Path, text: str, name: str = "vcemri.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    return caught.value.problems


pytestmark = pytest.mark.usefixtures("no_vcemri_environment")


def test_default_file_is_valid_and_spells_out_the_model_defaults():
    settings = load_settings(default_config_path())
    assert settings == Settings()
    assert settings.dicom.bind_address == "127.0.0.1"
    assert settings.storage.root.is_absolute()
    assert settings.storage.audit_log_path == settings.storage.root / "audit.jsonl"


def test_default_file_names_every_setting():
    def keys(data, prefix=""):
        for key, value in data.items():
            yield prefix + key
            if isinstance(value, dict) and key not in ("destinations", "models"):
                yield from keys(value, prefix + key + ".")

    written = set(keys(yaml.safe_load(default_config_path().read_text())))
    dumped = set(keys(Settings().model_dump(mode="json")))
    assert written == dumped


def test_an_empty_file_means_all_defaults(tmp_path):
    assert load_settings(_write(tmp_path, "")) == Settings()


def test_a_partial_file_keeps_the_other_defaults(tmp_path):
    settings = load_settings(_write(tmp_path, "dicom:\n  port: 104\n"))
    assert settings.dicom.port == 104
    assert settings.dicom.ae_title == "VCEMRI"
    assert settings.destinations["tps"].port == 11113


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "dicom:\n  port: 70000\n",
            "dicom.port: 70000 is not a valid TCP port (1-65535) [line 2]",
            id="bad-port",
        ),
        pytest.param(
            "dicom:\n  prot: 104\n",
            "dicom.prot: unknown key (did you mean 'port'? allowed: ae_title, "
            "allowed_calling_aes, bind_address, check_called_ae, max_associations, "
            "max_connections_per_address, other_storage, port, "
            "timeouts, tls) [line 2]",
            id="unknown-key",
        ),
        pytest.param(
            "destinations:\n  tps:\n    ae_title: TPS\n    port: 104\n",
            "destinations.tps.host: required setting is missing [line 2]",
            id="missing-destination-host",
        ),
        pytest.param(
            "routes:\n  - name: head-neck\n    match:\n      series_description: '(t1'\n"
            "    destinations: [tps]\n",
            "routes[0].match.series_description: '(t1' is not a valid regular expression "
            "(missing ), unterminated subpattern at position 0) [line 4]",
            id="bad-regex",
        ),
        pytest.param(
            "dicom:\n  tls:\n    certificate: node.pem\n    private_key: node.key\n",
            "dicom.tls.certificate: file '{dir}/node.pem' does not exist [line 3]",
            id="tls-file-missing",
        ),
    ],
)
def test_broken_configs_give_one_precise_problem(tmp_path, text, expected):
    (tmp_path / "node.key").write_text("key")  # only the certificate is missing
    path = _write(tmp_path, text)
    assert _problems(path) == [expected.format(dir=tmp_path.resolve())]


def test_every_problem_is_reported_in_one_pass(tmp_path):
    path = _write(tmp_path, "dicom:\n  port: 0\n  ae_title: THIS_TITLE_IS_TOO_LONG\n"
                            "logging:\n  level: LOUD\n")
    problems = _problems(path)
    assert len(problems) == 3
    assert problems[0].startswith("dicom.ae_title: 'THIS_TITLE_IS_TOO_LONG' is not a valid AE")
    assert problems[1].startswith("dicom.port: 0 is not a valid TCP port")
    assert problems[2].startswith("logging.level: 'LOUD' is not allowed")


def test_route_references_must_exist(tmp_path):
    path = _write(tmp_path, "routes:\n  - {name: a, model: big, destinations: [tps, pacs]}\n"
                            "  - {name: a, destinations: []}\n")
    assert _problems(path) == [
        "routes[0].model: 'big' is not a model (defined: default)",
        "routes[0].destinations[1]: 'pacs' is not a destination (defined: tps)",
        "routes[1].name: 'a' is used by an earlier route",
    ]


def test_duplicate_keys_are_errors_not_silently_merged(tmp_path):
    path = _write(tmp_path, "dicom:\n  port: 104\n  port: 105\n")
    [problem] = _problems(path)
    assert "duplicate key 'port' (first at line 2)" in problem
    assert problem.startswith("line 3")


def test_yaml_syntax_errors_name_the_line(tmp_path):
    [problem] = _problems(_write(tmp_path, "dicom:\n  port: [104\n"))
    assert problem.startswith("line 3, column 1: invalid YAML")


def test_top_level_must_be_a_mapping(tmp_path):
    assert _problems(_write(tmp_path, "- dicom\n")) == [
        "the top level must be a mapping of sections, not list"
    ]


def test_missing_file_is_a_config_error(tmp_path):
    assert _problems(tmp_path / "nope.yaml") == ["file does not exist"]


def test_relative_paths_resolve_against_the_file_directory(tmp_path, monkeypatch):
    conf = tmp_path / "etc"
    conf.mkdir()
    (conf / "node.pem").write_text("cert")
    (conf / "node.key").write_text("key")
    monkeypatch.chdir(tmp_path)  # elsewhere than the file
    settings = load_settings(_write(
        conf, "storage:\n  root: data\ndicom:\n  tls: {certificate: node.pem, private_key: node.key}\n"
    ))
    assert settings.storage.root == conf.resolve() / "data"
    assert settings.dicom.tls is not None
    assert settings.dicom.tls.certificate == conf.resolve() / "node.pem"


def test_client_verification_needs_a_ca(tmp_path):
    for name in ("a.pem", "a.key"):
        (tmp_path / name).write_text("x")
    path = _write(tmp_path, "dicom:\n  tls: {certificate: a.pem, private_key: a.key, "
                            "require_client_certificate: true}\n")
    assert _problems(path) == [
        "dicom.tls: require_client_certificate is true but no ca_certificates file is given "
        "to verify client certificates with [line 2]"
    ]


@pytest.mark.parametrize(
    ("text", "start"),
    [
        ("destinations:\n  tps: {ae_title: TPS, host: 'bad host!', port: 104}\n",
         "destinations.tps.host: 'bad host!' is not an IP address or host name"),
        ("dicom:\n  ae_title: 'A\\B'\n", "dicom.ae_title: 'A\\\\B' is not a valid AE title"),
        ("models:\n  default: {device: gpu}\n",
         "models.default.device: 'gpu' is not a device (auto, cpu, cuda or cuda:N)"),
        ("models:\n  default: {checkpoint: missing.safetensors}\n",
         "models.default.checkpoint: checkpoint file"),
        ("dicom:\n  timeouts: {acse_s: -1}\n",
         "dicom.timeouts.acse_s: -1 is not allowed: Input should be greater than 0"),
        ("series_rules:\n  t1w: {echo_time_ms: {min: 30, max: 10}}\n",
         "series_rules.t1w.echo_time_ms: min 30.0 is greater than max 10.0"),
        ("series_rules:\n  t2w: {exclude_description: [post]}\n",
         "series_rules.t2w: a series rule needs at least one condition"),
    ],
)
def test_value_checks(tmp_path, text, start):
    [problem] = _problems(_write(tmp_path, text))
    assert problem.startswith(start)


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("VCEMRI_DICOM__PORT", "2104")
    monkeypatch.setenv("VCEMRI_DESTINATIONS__TPS__HOST", "tps.example.org")
    monkeypatch.setenv("VCEMRI_DICOM__ALLOWED_CALLING_AES", '["MR1", "ROUTER"]')
    settings = load_settings(_write(tmp_path, "dicom:\n  port: 104\n  ae_title: NODE\n"))
    assert settings.dicom.port == 2104
    assert settings.dicom.ae_title == "NODE"
    assert settings.dicom.allowed_calling_aes == ["MR1", "ROUTER"]
    assert settings.destinations["tps"].host == "tps.example.org"
    assert settings.destinations["tps"].ae_title == "TPS"


def test_bad_environment_values_name_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("VCEMRI_DICOM__PORT", "70000")
    monkeypatch.setenv("VCEMRI_DICOM__PROT", "1")
    monkeypatch.setenv("VCEMRI_STORGE__ROOT", "/tmp")
    problems = _problems(_write(tmp_path, ""))
    assert problems[0].startswith("VCEMRI_STORGE__ROOT: environment variable names no setting")
    assert "dicom.port: 70000 is not a valid TCP port (1-65535) [from VCEMRI_DICOM__PORT]" in problems
    assert any(p.startswith("dicom.prot: unknown key") and "VCEMRI_DICOM__PROT" in p for p in problems)


def test_config_file_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VCEMRI_CONFIG", str(_write(tmp_path, "dicom: {port: 4242}\n")))
    assert load_settings().dicom.port == 4242


def test_series_rules_recognize_typical_descriptions():
    rules = Settings().series_rules
    cases = {
        "t1_tse_tra": "t1w", "AX T1 SE": "t1w", "sT1W_3D_TFE": "t1w",
        "t2_tse_tra": "t2w", "AX STIR": "t2w",
        "t1_tse_tra_post": "ce", "T1+C AX": "ce", "T1 FS GAD": "ce",
        "VCE-MRI SYNTHETIC (MMgSN-Net v1)": None, "t2* gre": None, "localizer": None,
    }
    for description, role in cases.items():
        header = {"SeriesDescription": description}
        found = [name for name, rule in (("t1w", rules.t1w), ("t2w", rules.t2w),
                                         ("ce", rules.contrast_enhanced)) if rule.matches(header)]
        assert found == ([role] if role else []), description


def test_contrast_agent_attribute_overrides_the_description():
    rules = Settings().series_rules
    header = {"SeriesDescription": "t1_tse_tra", "ContrastBolusAgent": "Gadovist"}
    assert not rules.t1w.matches(header)


def test_sequence_parameter_ranges():
    rule = SeriesRule(repetition_time_ms={"min": 300, "max": 1000}, echo_time_ms={"max": 30})
    assert rule.matches({"RepetitionTime": 600, "EchoTime": "12"})
    assert not rule.matches({"RepetitionTime": 3000, "EchoTime": 12})
    assert not rule.matches({"EchoTime": 12})  # a missing value cannot prove the sequence


def test_route_match():
    match = RouteMatch(calling_ae="^MR_", institution="queen")
    assert match.matches({"CallingAETitle": "MR_SCANNER1", "Modality": "MR",
                          "InstitutionName": "Queen Mary Hospital"})
    assert not match.matches({"CallingAETitle": "CT1", "Modality": "MR",
                              "InstitutionName": "Queen Mary Hospital"})
    assert not match.matches({"CallingAETitle": "MR_1", "Modality": "CT",
                              "InstitutionName": "Queen Mary Hospital"})


def test_settings_are_immutable():
    settings = Settings()
    with pytest.raises(ValueError):
        settings.dicom.port = 1  # type: ignore[misc]


def test_non_json_list_in_the_environment_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("VCEMRI_DESTINATIONS", "notjson")
    [problem] = _problems(_write(tmp_path, ""))
    assert "must be JSON" in problem and "VCEMRI_DESTINATIONS" in problem


def test_a_key_that_is_not_a_name_is_a_config_error(tmp_path):
    [problem] = _problems(_write(tmp_path, "? [a, b]\n: 1\n"))
    assert "a key must be a plain name, not a list" in problem


def test_printed_settings_mask_the_broker_password():
    """`vcemri config check` prints the effective settings: a broker URL's password is masked
    there, the rest of the URL kept; a result backend must be Redis."""
    from config import effective_yaml

    settings = Settings(jobs={"backend": "celery", "celery": {
        "broker_url": "amqp://vcemri:s3cret@rabbit.lan:5672//",
        "result_backend": "redis://:other-s3cret@redis.lan:6379/1"}})
    printed = effective_yaml(settings)
    assert "s3cret" not in printed
    assert "amqp://vcemri:**@rabbit.lan:5672//" in printed
    assert "redis://:**@redis.lan:6379/1" in printed
    with pytest.raises(ValueError, match="result_backend must be a redis"):
        Settings(jobs={"celery": {"broker_url": "amqp://guest:guest@localhost//"}})
