"""A method's training options and its own enumerated options are checked at start (check_options), in one line
that names the valid values, including where a method's schema only changes a default (CoOp's train, CALIP-FS's
beta_source) and in nested schemas (RTOS's relation, SHIP's generator and hosts)."""

from __future__ import annotations

import pytest

from clipadapt.config import ConfigError, check_options


@pytest.mark.parametrize("method,override,message", [
    # CoOp's train schema only changes the default (sgd): the rule is TrainSchema's
    ("coop", "method.train.optimizer=adam", "method.train.optimizer=adam: use one of adamw, sgd"),
    ("coop", "method.train.schedule=linear", "method.train.schedule=linear: use one of cosine, constant"),
    ("coop", "method.train.views=all", "method.train.views=all: use one of augment, plain"),
    ("coop", "method.train.warmup_epochs=-1", "method.train.warmup_epochs=-1: must be >= 0"),
    ("clip_adapter", "method.train.lr=0", "method.train.lr=0.0: must be > 0"),
    ("clip_adapter", "method.train.batch_size=0", "method.train.batch_size=0: must be >= 1"),
    ("tip_adapter_f", "method.train.epochs=-1", "method.train.epochs=-1: must be >= 0"),
    ("vt_clip", "method.train.weight_decay=-0.1", "method.train.weight_decay=-0.1: must be >= 0"),
    ("calip", "method.pool=sum", "method.pool=sum: use one of mean+max, mean, max"),
    ("calip_fs", "method.beta_source=test", "method.beta_source=test: use one of search, paper"),
    ("calip_fs", "method.proj_type=mlp", "method.proj_type=mlp: use one of linear_identity, mlp_bottleneck128"),
    ("ccli", "method.aggregate=max", "method.aggregate=max: use one of weighted, mean, none"),
    ("ccli", "method.concept_pool=crops", "method.concept_pool=crops: use one of global, views"),
    ("ccli", "method.head=transformer", "method.head=transformer: use one of linear, mlp"),
    ("ccli", "method.text_init=random", "method.text_init=random: use one of zero, class_similarity"),
    ("rtos", "method.relation.mode=cosine", "method.relation.mode=cosine: use one of softmax_anchor, raw_cosine"),
    ("rtos", "method.rtm.init=orthogonal", "method.rtm.init=orthogonal: use one of identity, xavier"),
    ("rtos", "method.anchors.init=zeros", "method.anchors.init=zeros: use one of names, random"),
    ("rtos", "method.precision=fp16", "method.precision=fp16: use one of fp32, bf16"),
    ("vt_clip", "method.norm=mid", "method.norm=mid: use one of post, pre"),
    ("vt_clip", "method.residual_mode=sum", "method.residual_mode=sum: use one of convex, additive"),
    ("coop", "method.precision=fp8", "method.precision=fp8: use one of fp32, bf16"),
    ("clip_adapter", "method.reduction=0", "method.reduction=0: must be >= 1"),
    ("ship", "method.stage2=vt_clip", "method.stage2=vt_clip: use one of coop, clip_adapter, tip_adapter_f"),
    ("ship", "method.generator.activation=gelu", "method.generator.activation=gelu: use one of relu, leaky_relu"),
    ("ship", "method.coop.train.optimizer=adam", "method.coop.train.optimizer=adam: use one of adamw, sgd"),
    ("ship", "method.train.optimizer=adam", "method.train.optimizer=adam: use one of adamw, sgd"),  # host override
])
def test_a_method_option_outside_its_choices_or_bounds_fails_at_start(tiny_config, method, override, message):
    check_options(tiny_config(f"method={method}"))  # its defaults pass
    with pytest.raises(ConfigError) as error:
        check_options(tiny_config(f"method={method}", override))
    assert str(error.value) == message


def test_every_offending_option_on_one_line(tiny_config):
    cfg = tiny_config("method=coop", "method.train.optimizer=adam", "method.train.lr=-1", "shots=0")
    with pytest.raises(ConfigError) as error:
        check_options(cfg)
    assert str(error.value) == ("shots=0: must be >= 1; method.train.optimizer=adam: use one of adamw, sgd; "
                                "method.train.lr=-1.0: must be > 0")


def test_a_null_where_the_schema_allows_one_passes(tiny_config):
    """CoOp's train.epochs=null means epochs_by_shots: a bound on epochs does not refuse it."""
    cfg = tiny_config("method=coop", "method.train.epochs=null")
    check_options(cfg)
    assert cfg.method.train.epochs is None
