"""The load-time logit probe: passes for the known families, refuses a model whose
forward transforms its logits in a way the table does not know, and can be turned off."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from fastrlhf.models import PolicyModel, load_policy
from fastrlhf.models.probe import LogitProbeMismatch, check_logits
from tests.models.families import make_config

FACTOR = 3.0


class MysteryConfig(LlamaConfig):
    model_type = "fastrlhf_test_mystery"


class MysteryForCausalLM(LlamaForCausalLM):
    """A Llama whose forward multiplies the logits by a factor no table knows."""

    config_class = MysteryConfig

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * FACTOR
        return out


@pytest.fixture(scope="module")
def mystery_dir(tmp_path_factory):
    AutoConfig.register(MysteryConfig.model_type, MysteryConfig, exist_ok=True)
    AutoModelForCausalLM.register(MysteryConfig, MysteryForCausalLM, exist_ok=True)
    config = MysteryConfig(**make_config("llama").to_diff_dict() | {"model_type": None})
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mystery")
    MysteryForCausalLM(config).save_pretrained(str(path))
    return str(path)


def test_unknown_logit_factor_is_refused_in_one_line(mystery_dir):
    with pytest.raises(LogitProbeMismatch) as info:
        load_policy(mystery_dir)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("MysteryForCausalLM: ")
    assert "model.logit_probe=false" in message
    diff = float(message.split(" by ")[1].split(" ")[0])
    assert diff > 0.1


def test_probe_can_be_turned_off(mystery_dir):
    policy = load_policy(mystery_dir, logit_probe=False)
    assert type(policy.causal_lm).__name__ == "MysteryForCausalLM"


@pytest.mark.parametrize("family", ["llama", "gemma2", "granite"])
def test_known_families_pass(family, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(family))
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(str(tmp_path))
    policy = load_policy(str(tmp_path))  # probes by default
    assert check_logits(policy) < 1e-5


def test_probe_catches_a_wrong_table_entry():
    from fastrlhf.models.heads import HeadTransform

    policy = PolicyModel(AutoModelForCausalLM.from_config(make_config("gemma2")))
    with torch.no_grad():
        policy.lm_head_weight.mul_(40.0)
    policy.head = HeadTransform()  # as if the soft-cap were unknown
    with pytest.raises(LogitProbeMismatch, match="Gemma2ForCausalLM: .*known: none"):
        check_logits(policy)


def test_probe_leaves_every_module_in_its_mode(tmp_path):
    AutoModelForCausalLM.from_config(make_config("llama")).save_pretrained(str(tmp_path))
    without = load_policy(str(tmp_path), logit_probe=False)
    probed = load_policy(str(tmp_path))
    modes = [m.training for m in without.modules()]
    assert [m.training for m in probed.modules()] == modes
