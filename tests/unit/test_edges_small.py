"""Small edges a careless user or a crash finds (H6): each refusal names what the user gave."""

from __future__ import annotations

import pytest

from lepton.client import cli

NOWHERE = "127.0.0.1:1"  # nothing listens: a command that got this far would say "cannot reach"


def run(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(["--server", NOWHERE, *argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("argv", "says"), [
    (("serve", "update", "web", ""), "model name is required"),
    (("serve", "up", "", "--name", "web"), "model name is required"),
    (("models", "show", ""), "model name is required"),
    (("models", "rm", ""), "model name is required"),
    (("models", "show", "a/b"), "model name 'a/b' may hold only"),
    (("data", "show", ""), "dataset name is required"),
])
def test_an_empty_or_bad_name_names_what_is_missing(capsys, argv, says):
    code, err = run(capsys, *argv)
    assert code != 0, err
    assert err.count("\n") == 1 and err.startswith("lepton-ctl: ") and says in err, err
    assert "cannot reach" not in err, err


def test_a_deployment_spec_without_a_model_names_the_model():
    from lepton.common.errors import InvalidArgument
    from lepton.common.validation import check_deployment_spec
    from lepton.v1 import serving_pb2

    with pytest.raises(InvalidArgument, match="^model name is required$"):
        check_deployment_spec(serving_pb2.DeploymentSpec(name="web", replicas=1))
