"""The student factory: auto budgets, derived students initialised from the teacher, zoo specs, saving."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from worker.compression.errors import SpecError
from worker.compression.spec import AutoStudent, DerivedStudent, HFConfigStudent, StudentSpec, ZooStudent
from worker.compression.students import zoo
from worker.compression.students.factory import make_student, save_student
from worker.compression.types import Teacher

CONFIGS: dict[str, dict[str, Any]] = {
    "mlp": {"architecture": "mlp", "input_dim": 20, "hidden": [64, 48, 32], "output_dim": 5},
    "cnn": {
        "architecture": "cnn",
        "in_channels": 3,
        "input_size": [12, 12],
        "channels": [8, 16, 24],
        "hidden": 16,
        "output_dim": 4,
    },
    "cnn1d": {
        "architecture": "cnn1d",
        "in_channels": 2,
        "input_length": 24,
        "channels": [8, 16],
        "output_dim": 3,
        "task": "regression",
    },
    "resnet": {
        "architecture": "resnet",
        "in_channels": 3,
        "input_size": [8, 8],
        "widths": [8, 16],
        "blocks_per_stage": [2, 2],
        "output_dim": 4,
    },
    "transformer": {
        "architecture": "transformer",
        "vocab_size": 50,
        "max_len": 10,
        "dim": 32,
        "num_layers": 4,
        "num_heads": 4,
        "ffn_dim": 64,
        "output_dim": 6,
        "task": "embedding",
    },
}


def zoo_teacher(cfg: dict[str, Any]) -> Teacher:
    cfg = zoo.validate_config(cfg)
    module = zoo.build(cfg)
    for m in module.modules():  # non-trivial BatchNorm statistics, so copying them is checked too
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    module.eval()
    return Teacher(
        kind="zoo",
        task=cfg["task"],
        input_kind=zoo.input_kind(cfg),
        input_shape=zoo.input_shape(cfg),
        output_dim=int(cfg["output_dim"]),
        config=cfg,
        module=module,
        num_parameters=zoo.count_parameters(module),
    )


def sample_inputs(teacher: Teacher, n: int = 3) -> dict[str, torch.Tensor]:
    if teacher.input_kind == "tokens":
        ids = torch.randint(0, 50, (n, *teacher.input_shape))
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    return {"x": torch.randn(n, *teacher.input_shape)}


def student_output(student_module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    student_module.eval()
    with torch.no_grad():
        return student_module(**inputs)


def blackbox_teacher(input_kind: str, shape: tuple[int, ...], num_parameters: int, **extra: Any) -> Teacher:
    return Teacher(
        kind="onnx",
        task="classification",
        input_kind=input_kind,
        input_shape=shape,
        output_dim=7,
        config=extra,
        run_onnx=lambda inputs: torch.zeros(next(iter(inputs.values())).shape[0], 7),
        num_parameters=num_parameters,
    )


# --- auto ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_auto_zoo_student_is_within_the_default_budget_and_initialised_from_the_teacher(arch: str) -> None:
    teacher = zoo_teacher(CONFIGS[arch])
    student = make_student(teacher, AutoStudent())
    assert student.how == "auto" and student.kind == "zoo"
    assert student.config["architecture"] == arch
    assert student.num_parameters == zoo.count_parameters(student.module)
    assert student.num_parameters <= 0.25 * teacher.num_parameters
    assert student.num_parameters > 0.1 * teacher.num_parameters  # the budget is used, not wasted
    assert student.init is not None and student.init.partial > 0
    assert student.module.kdq_layer_map == student.layer_map and student.layer_map
    out = student_output(student.module, sample_inputs(teacher))
    assert out.shape == (3, teacher.output_dim)
    assert student.config["task"] == teacher.task


def test_auto_zoo_student_respects_max_params() -> None:
    teacher = zoo_teacher(CONFIGS["mlp"])
    student = make_student(teacher, AutoStudent(max_params=900))
    assert 450 < student.num_parameters <= 900


@pytest.mark.parametrize(
    ("input_kind", "shape", "arch"),
    [
        ("vector", (30,), "mlp"),
        ("image", (1, 16, 16), "cnn"),
        ("signal", (3, 40), "cnn1d"),
        ("tokens", (12,), "transformer"),
    ],
)
def test_auto_student_for_a_black_box_teacher_fits_its_budget(
    input_kind: str, shape: tuple[int, ...], arch: str
) -> None:
    teacher = blackbox_teacher(input_kind, shape, 400_000, vocab_size=300)
    student = make_student(teacher, AutoStudent(max_params_ratio=0.1))
    assert student.config["architecture"] == arch and student.how == "auto"
    assert 20_000 < student.num_parameters <= 40_000
    assert student.layer_map is None and student.init is None
    out = student_output(
        student.module,
        sample_inputs(teacher) if input_kind != "tokens" else {"input_ids": torch.randint(0, 300, (2, 12))},
    )
    assert out.shape[1] == 7


def test_auto_tokens_student_takes_the_vocabulary_from_the_tokenizer() -> None:
    class Tok:
        def __len__(self) -> int:
            return 123

    teacher = blackbox_teacher("tokens", (8,), 100_000)
    teacher.tokenizer = Tok()
    assert make_student(teacher, AutoStudent()).config["vocab_size"] == 123


def test_auto_tokens_student_without_a_known_vocabulary_is_refused() -> None:
    with pytest.raises(SpecError, match="vocab_size"):
        make_student(blackbox_teacher("tokens", (8,), 100_000), AutoStudent())


@pytest.mark.parametrize(
    "teacher", [zoo_teacher(CONFIGS["cnn"]), blackbox_teacher("vector", (30,), 100_000)], ids=["zoo", "onnx"]
)
def test_impossible_budget_is_a_spec_error_naming_the_smallest_size(teacher: Teacher) -> None:
    with pytest.raises(SpecError, match=r"smallest .*has \d+"):
        make_student(teacher, AutoStudent(max_params=50))


def test_ratio_budget_needs_a_known_teacher_size() -> None:
    with pytest.raises(SpecError, match="max_params"):
        make_student(blackbox_teacher("vector", (30,), 0), AutoStudent())


# --- derived ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_derived_student_at_full_width_and_depth_reproduces_the_teacher(arch: str) -> None:
    teacher = zoo_teacher(CONFIGS[arch])
    student = make_student(teacher, DerivedStudent(width_ratio=1.0))
    assert student.init is not None and student.init.partial == 0 and student.init.none == 0
    inputs = sample_inputs(teacher)
    assert torch.equal(student_output(student.module, inputs), teacher.predict(inputs))


def test_derived_narrower_mlp_copies_the_most_important_units() -> None:
    teacher = zoo_teacher({"architecture": "mlp", "input_dim": 6, "hidden": [8, 8], "output_dim": 3})
    t = teacher.module
    with torch.no_grad():  # make units 1, 3, 6, 7 of layer 0 and 0, 2, 4, 5 of layer 1 the important ones
        for layer, important, scale in ((t.layers[0], [1, 3, 6, 7], 10.0), (t.layers[1], [0, 2, 4, 5], 1.0)):
            layer.weight.mul_(0.01)
            layer.bias.mul_(0.01)
            layer.weight[important] = torch.randn(4, layer.weight.shape[1]) * scale
        t.head.weight.mul_(0.01)
    student = make_student(teacher, DerivedStudent(width_ratio=0.5))
    s = student.module
    assert student.config["hidden"] == [4, 4]
    keep0, keep1 = torch.tensor([1, 3, 6, 7]), torch.tensor([0, 2, 4, 5])
    assert torch.equal(s.layers[0].weight, t.layers[0].weight[keep0])
    assert torch.equal(s.layers[0].bias, t.layers[0].bias[keep0])
    assert torch.equal(s.layers[1].weight, t.layers[1].weight[keep1][:, keep0])
    assert torch.equal(s.layers[1].bias, t.layers[1].bias[keep1])
    assert torch.equal(s.head.weight, t.head.weight[:, keep1])
    assert torch.equal(s.head.bias, t.head.bias)
    assert student.init is not None and (student.init.full, student.init.partial) == (1, 5)


def test_derived_narrower_cnn_slices_batchnorm_statistics_with_the_channels() -> None:
    teacher = zoo_teacher(
        {"architecture": "cnn", "in_channels": 1, "input_size": [8, 8], "channels": [8], "output_dim": 2}
    )
    t_conv, t_bn = teacher.module.blocks[0][0], teacher.module.blocks[0][1]
    with torch.no_grad():
        t_bn.weight[[2, 5]] = 50.0
    student = make_student(teacher, DerivedStudent(width_ratio=0.5))
    s_conv, s_bn = student.module.blocks[0][0], student.module.blocks[0][1]
    kept = s_bn.running_mean[:, None] == t_bn.running_mean[None, :]
    idx = kept.nonzero()[:, 1]
    assert len(idx) == 4 and {2, 5} <= set(idx.tolist())
    assert torch.equal(s_bn.running_var, t_bn.running_var[idx])
    assert torch.equal(s_conv.weight, t_conv.weight[idx])


def test_derived_shallower_mlp_keeps_the_chosen_layers() -> None:
    teacher = zoo_teacher({"architecture": "mlp", "input_dim": 5, "hidden": [8, 12, 16, 10], "output_dim": 2})
    student = make_student(teacher, DerivedStudent(layers=[0, 2]))
    s, t = student.module, teacher.module
    assert student.config["hidden"] == [8, 16]
    assert student.layer_map == {0: 0, 1: 2}
    assert torch.equal(s.layers[0].weight, t.layers[0].weight)
    assert torch.equal(s.layers[1].bias, t.layers[2].bias)
    # layer 2 read 12 units of layer 1; the student feeds it 8, so 8 of its teacher columns are kept in order
    cols = [
        next(c for c in range(12) if torch.equal(s.layers[1].weight[:, j], t.layers[2].weight[:, c]))
        for j in range(8)
    ]
    assert cols == sorted(cols) and len(set(cols)) == 8


def test_derived_shallower_transformer_copies_chosen_layers_distilbert_style() -> None:
    teacher = zoo_teacher(CONFIGS["transformer"])
    student = make_student(teacher, DerivedStudent(layers=[1, 3]))
    assert student.config["num_layers"] == 2 and student.layer_map == {0: 0, 1: 2, 2: 4}
    t_state, s_state = teacher.module.state_dict(), student.module.state_dict()
    for j, i in enumerate([1, 3]):
        for name in ("qkv.weight", "out.bias", "ff1.weight", "ln2.weight"):
            assert torch.equal(s_state[f"layers.{j}.{name}"], t_state[f"layers.{i}.{name}"])
    assert torch.equal(s_state["tok.weight"], t_state["tok.weight"])
    evenly = make_student(teacher, DerivedStudent(num_layers=2))
    assert evenly.layer_map == {0: 0, 1: 1, 2: 4}  # first and last layers


def test_derived_narrower_transformer_keeps_heads_and_dim_divisible() -> None:
    teacher = zoo_teacher(CONFIGS["transformer"])
    student = make_student(teacher, DerivedStudent(width_ratio=0.5))
    assert (student.config["dim"], student.config["num_heads"], student.config["ffn_dim"]) == (16, 4, 32)
    qkv_t, qkv_s = teacher.module.layers[0].qkv.weight, student.module.layers[0].qkv.weight
    # each head keeps 4 of its 8 dims, the same ones for q, k and v
    cols = student_cols(teacher, student)
    rows = [next(r for r in range(96) if torch.equal(qkv_t[r, cols], qkv_s[j])) for j in range(48)]
    q, k, v = rows[:16], rows[16:32], rows[32:]
    assert [r - 32 for r in k] == q and [r - 64 for r in v] == q
    assert [r // 8 for r in q] == [h for h in range(4) for _ in range(4)]


def student_cols(teacher: Teacher, student: Any) -> torch.Tensor:
    """The residual dims the student kept, read off the token embedding."""
    t_tok, s_tok = teacher.module.tok.weight, student.module.tok.weight
    return torch.tensor(
        [
            next(c for c in range(t_tok.shape[1]) if torch.equal(t_tok[:, c], s_tok[:, j]))
            for j in range(s_tok.shape[1])
        ]
    )


def test_derived_resnet_layers_count_blocks_across_stages() -> None:
    teacher = zoo_teacher(CONFIGS["resnet"])
    student = make_student(teacher, DerivedStudent(layers=[1, 2]))
    assert student.config["blocks_per_stage"] == [1, 1]
    assert torch.equal(student.module.stages[0][0].conv2.weight, teacher.module.stages[0][1].conv2.weight)
    assert torch.equal(
        student.module.stages[1][0].shortcut[0].weight, teacher.module.stages[1][0].shortcut[0].weight
    )
    with pytest.raises(SpecError, match="each resnet stage"):
        make_student(teacher, DerivedStudent(layers=[0, 1]))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (DerivedStudent(layers=[0, 5]), "must pick among"),
        (DerivedStudent(layers=[2, 1]), "strictly increasing"),
        (DerivedStudent(num_layers=9), "between 1 and"),
        (DerivedStudent(max_params=100), "over the budget"),
    ],
)
def test_bad_derived_specs_are_spec_errors(spec: StudentSpec, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        make_student(zoo_teacher(CONFIGS["mlp"]), spec)


def test_derived_and_hf_config_need_a_suitable_teacher() -> None:
    onnx = blackbox_teacher("vector", (30,), 10_000)
    with pytest.raises(SpecError, match="black box"):
        make_student(onnx, DerivedStudent())
    with pytest.raises(SpecError, match="Hugging Face teacher"):
        make_student(onnx, HFConfigStudent(hf_config={"model_type": "bert"}))


# --- zoo -------------------------------------------------------------------------------------


def test_zoo_student_is_filled_from_the_teacher() -> None:
    teacher = zoo_teacher(CONFIGS["cnn"])
    student = make_student(
        teacher, ZooStudent(architecture={"architecture": "resnet", "widths": [4]})
    )
    assert student.how == "zoo" and student.layer_map is None
    assert (student.config["in_channels"], student.config["input_size"], student.config["output_dim"]) == (
        3,
        [12, 12],
        4,
    )
    assert student_output(student.module, sample_inputs(teacher)).shape == (3, 4)


@pytest.mark.parametrize(
    ("architecture", "message"),
    [
        ({"architecture": "mlp", "hidden": [8], "output_dim": 9}, "output_dim"),
        ({"architecture": "mlp", "hidden": [8], "input_dim": 7}, "input_dim"),
        ({"architecture": "mlp", "hidden": [8], "task": "regression"}, "task"),
        ({"architecture": "cnn", "channels": [8]}, "image inputs"),
        ({"architecture": "gru"}, "unknown zoo architecture"),
    ],
)
def test_zoo_student_incompatible_with_the_teacher_is_a_spec_error(
    architecture: dict[str, Any], message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        make_student(zoo_teacher(CONFIGS["mlp"]), ZooStudent(architecture=architecture))


def test_zoo_transformer_student_needs_room_for_the_teacher_vocabulary() -> None:
    teacher = zoo_teacher(CONFIGS["transformer"])
    arch = {"architecture": "transformer", "dim": 8, "num_layers": 1, "num_heads": 2}
    assert make_student(teacher, ZooStudent(architecture=arch)).config["vocab_size"] == 50
    with pytest.raises(SpecError, match="at least 50"):
        make_student(teacher, ZooStudent(architecture={**arch, "vocab_size": 20}))


# --- seeds and saving ------------------------------------------------------------------------


def test_students_are_repeatable_with_a_seed_and_leave_the_global_rng_alone() -> None:
    teacher = zoo_teacher(CONFIGS["cnn"])
    spec = ZooStudent(architecture={"architecture": "cnn", "channels": [4, 8]})
    state_before = torch.get_rng_state()
    a, b = make_student(teacher, spec, seed=3), make_student(teacher, spec, seed=3)
    c = make_student(teacher, spec, seed=4)
    assert torch.equal(torch.get_rng_state(), state_before)
    for name, value in a.module.state_dict().items():
        assert torch.equal(value, b.module.state_dict()[name])
    assert not torch.equal(a.module.blocks[0][0].weight, c.module.blocks[0][0].weight)
    auto1, auto2 = make_student(teacher, AutoStudent(), seed=1), make_student(teacher, AutoStudent(), seed=1)
    assert auto1.config == auto2.config
    assert all(torch.equal(v, auto2.module.state_dict()[k]) for k, v in auto1.module.state_dict().items())


@pytest.mark.parametrize("arch", ["cnn", "transformer"])
def test_saved_student_loads_back_with_identical_outputs(arch: str, tmp_path: Any) -> None:
    from worker.compression.io.teachers import load_teacher

    teacher = zoo_teacher(CONFIGS[arch])
    student = make_student(teacher, AutoStudent())
    folder = save_student(student, tmp_path / "student", teacher)
    loaded = load_teacher(folder)
    assert loaded.kind == "zoo" and loaded.num_parameters == student.num_parameters
    assert loaded.config["architecture"] == arch and loaded.task == teacher.task
    inputs = sample_inputs(teacher)
    assert torch.equal(loaded.predict(inputs), student_output(student.module, inputs))


# --- Hugging Face teachers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_teacher(tmp_path_factory: pytest.TempPathFactory) -> Teacher:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    from worker.compression.io.teachers import load_teacher

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bert")
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "the",
        "a",
        "cat",
        "dog",
        "sat",
        "on",
        "mat",
        "good",
        "bad",
    ]
    BertForSequenceClassification(
        BertConfig(
            vocab_size=60,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
            initializer_range=0.2,
            num_labels=3,
        )
    ).eval().save_pretrained(folder)
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(folder)
    return load_teacher(folder)


def hf_inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 14, (3, 8))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_auto_hf_student_halves_the_layers_then_narrows_within_budget(hf_teacher: Teacher) -> None:
    student = make_student(hf_teacher, AutoStudent(max_params=18_000))  # 2 layers at full width: 21,315
    assert student.kind == "hf" and student.how == "auto"
    assert student.config["num_hidden_layers"] == 2 and student.config["intermediate_size"] < 64
    assert 15_000 < student.num_parameters <= 18_000
    assert student.layer_map == {0: 0, 1: 1, 2: 4} and student.module.kdq_layer_map == student.layer_map


def test_auto_hf_student_over_any_budget_is_the_smallest_and_says_so(hf_teacher: Teacher) -> None:
    student = make_student(hf_teacher, AutoStudent(max_params=1_000))
    assert student.config["num_hidden_layers"] == 1 and student.config["intermediate_size"] == 4
    assert student.num_parameters > 1_000 and "over the budget" in student.description


def test_derived_hf_student_saves_and_loads_back_with_identical_outputs(
    hf_teacher: Teacher, tmp_path: Any
) -> None:
    from worker.compression.io.teachers import load_teacher

    student = make_student(hf_teacher, DerivedStudent(layers=[1, 3], width_ratio=0.5))
    assert student.how == "derived" and student.layer_map == {0: 0, 1: 2, 2: 4}
    loaded = load_teacher(save_student(student, tmp_path / "student", hf_teacher))
    assert loaded.kind == "hf" and loaded.tokenizer is not None
    inputs = hf_inputs()
    assert torch.equal(loaded.predict(inputs), student_output(student.module, inputs))


def test_hf_config_student(hf_teacher: Teacher) -> None:
    student = make_student(hf_teacher, HFConfigStudent(hf_config={"num_hidden_layers": 1}))
    assert student.how == "hf_config" and student.config["num_hidden_layers"] == 1
    assert student_output(student.module, hf_inputs()).shape == (3, 3)


def test_zoo_transformer_student_of_an_hf_teacher_is_saved_with_the_tokenizer(
    hf_teacher: Teacher, tmp_path: Any
) -> None:
    from worker.compression.io.teachers import load_teacher

    arch = {"architecture": "transformer", "dim": 8, "num_layers": 1, "num_heads": 2}
    student = make_student(hf_teacher, ZooStudent(architecture=arch))
    assert (student.config["vocab_size"], student.config["max_len"]) == (len(hf_teacher.tokenizer), 32)
    folder = save_student(student, tmp_path / "student", hf_teacher)
    assert (folder / "tokenizer_config.json").is_file()
    inputs = hf_inputs()
    assert torch.equal(load_teacher(folder).predict(inputs), student_output(student.module, inputs))


def test_mlp_student_flattens_signal_and_image_teachers():
    """The MNIST-1D case: a 1D-CNN teacher distilled into an MLP student."""
    for cfg, shape in (
        ({"architecture": "cnn1d", "in_channels": 1, "input_length": 40, "channels": [8, 8], "output_dim": 10},
         (3, 1, 40)),
        ({"architecture": "cnn", "in_channels": 1, "input_size": [8, 8], "channels": [8, 8], "output_dim": 10},
         (3, 1, 8, 8)),
    ):
        module = zoo.build(cfg)
        cfg = zoo.validate_config(cfg)
        teacher = Teacher(kind="zoo", task="classification", input_kind=zoo.input_kind(cfg),
                          input_shape=zoo.input_shape(cfg), output_dim=10, config=cfg, module=module,
                          num_parameters=zoo.count_parameters(module))
        student = make_student(teacher, ZooStudent(architecture={"architecture": "mlp",
                                                                               "hidden": [16]}))
        assert student.config["input_dim"] == math.prod(shape[1:])
        assert student.module(x=torch.randn(*shape)).shape == (3, 10)


def test_a_small_black_box_teacher_gets_the_smallest_student_under_the_default_budget() -> None:
    teacher = blackbox_teacher("image", (1, 8, 8), 6_000)  # a quarter of it fits no CNN student
    student = make_student(teacher, AutoStudent())
    assert student.config["architecture"] == "cnn" and student.num_parameters < teacher.num_parameters
    assert "smallest of its kind" in student.description
    with pytest.raises(SpecError, match=r"smallest .*has \d+"):  # a budget the user gave stays a limit
        make_student(teacher, AutoStudent(max_params_ratio=0.25))
    with pytest.raises(SpecError, match="the teacher 900"):  # never a student as large as the teacher
        make_student(blackbox_teacher("image", (1, 8, 8), 900), AutoStudent())
