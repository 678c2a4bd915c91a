import pytest
import torch

from lvm_pl.finite import NonFiniteLossError, check_finite


def test_finite_terms_pass():
    assert check_finite({"a": torch.tensor(1.0), "b": torch.ones(3)}, step=3)


def test_stop_names_step_and_term():
    with pytest.raises(NonFiniteLossError, match=r"step 7: rec=nan"):
        check_finite({"ok": torch.tensor(1.0), "rec": torch.tensor(float("nan"))}, step=7)


def test_skip_warns_and_returns_false():
    with pytest.warns(UserWarning, match="g_adv=inf"):
        assert not check_finite({"g_adv": torch.tensor(float("inf"))}, step=1, policy="skip")
