import subprocess
import sys

import pytest

from flows.cli import STAGES, build_parser, main


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_has_help_with_the_common_options(stage, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([stage, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--config", "--root", "--set"):
        assert option in out


def test_invalid_override_is_a_clear_error(tmp_path, capsys):
    assert main(["ingest", "--root", str(tmp_path), "--set", "hierarchy.cuts=[0.2, 0.5]"]) == 2
    assert "non-increasing" in capsys.readouterr().err


def test_judge_of_a_source_without_masks_is_refused_before_any_work(tmp_path, capsys):
    assert main(["judge", "--root", str(tmp_path / "r"), "--set", "source.kind=imagefolder",
                 "--set", f"source.path={tmp_path}"]) == 2
    assert "scenes judge" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_console_script_is_installed():
    done = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "pipeline" in done.stdout


def test_force_is_a_choice_list_prefect_validates_and_shows_as_a_dropdown():
    from prefect.exceptions import ParameterTypeError
    from prefect.utilities.callables import parameter_schema

    from flows.stages import FLOWS, UPSTREAM

    for name, flow in FLOWS.items():
        schema = parameter_schema(flow).model_dump()
        force = schema["properties"]["force"]
        choices = [option for item in force.get("anyOf", [force]) for option in item.get("enum", [])]
        assert choices == list(UPSTREAM), name           # every stage, in pipeline order, and nothing else
        with pytest.raises(ParameterTypeError, match="force"):
            flow.validate_parameters({"force": "trian"})
        assert flow.validate_parameters({"force": "train"})["force"] == "train"
