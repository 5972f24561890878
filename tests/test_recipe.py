"""`stepflash recipe` and its pieces: the tool-call reward, the recipe's eval items (solved by their own references
through the eval harness), the MTP clone phase (exact copies, only MTP weights move, losses against the model's
own teacher-forced chain), logit distillation against torch's KL, and a tiny end-to-end run that resumes."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from stepflash.chat import ChatTemplate
from stepflash.errors import UserError
from stepflash.evaluation.harness import EvalArgs, evaluate
from stepflash.posttrain.recipe_data import DOMAINS, compact_chat_template, domain_tasks, write_eval_set
from stepflash.posttrain.recipe_train import distill_kl
from stepflash.model import Step35ForCausalLM
from stepflash.tasks.rewards import REWARDS
from stepflash.rl.rollout import render_task
from stepflash.tasks.generators import Task, tool_tasks
from stepflash.posttrain.mtp_phase import clone_mtp_modules, masked_mtp_losses, train_mtp_phase

pytestmark = pytest.mark.usefixtures("one_thread")

TOOLS = [{"type": "function", "function": {"name": "transfer", "parameters": {"type": "object", "properties": {
    "source": {"type": "string"}, "target": {"type": "string"}, "amount": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "get_balance", "parameters": {"type": "object", "properties": {
        "account": {"type": "string"}}}}}]
TASK = Task("Send 30 from bob to alice.", "", "tool_call",
            {"tools": TOOLS, "call": {"name": "transfer", "arguments": {"source": "bob", "target": "alice", "amount": 30}}})


def reply(name: str, **args) -> str:
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in args.items())
    return f"Call {name}.\n</think>\n<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


# ---- the tool-call reward ---------------------------------------------------------------------------

@pytest.mark.parametrize("completion,expected", [
    (reply("transfer", source="bob", target="alice", amount=30), 1.0),
    (reply("transfer", target="alice", source="bob", amount=30), 1.0),  # argument order does not matter
    ("no thinking here " + reply("transfer", source="bob", target="alice", amount=30).split("</think>\n")[1], 1.0),
    (reply("transfer", source="bob", target="alice", amount=31), 0.0),  # wrong argument value
    (reply("transfer", source="alice", target="bob", amount=30), 0.0),  # swapped arguments
    (reply("transfer", source="bob", target="alice"), 0.0),  # missing argument
    (reply("transfer", source="bob", target="alice", amount=30, note="x"), 0.0),  # extra argument
    (reply("get_balance", account="bob"), 0.0),  # wrong function
    (reply("withdraw", source="bob", target="alice", amount=30), 0.0),  # a function not offered
    (reply("transfer", source="bob", target="alice", amount=30).replace("</function>", ""), 1.0),  # repaired, as served
    (reply("transfer", source="bob", target="alice", amount=30).replace("<function=", "<func="), 0.0),  # malformed XML
    (reply("transfer", source="bob", target="alice", amount=30).replace("<parameter=amount>", "<param=amount>"), 0.0),
    ("I would transfer 30 from bob to alice.", 0.0),  # no call
    (reply("transfer", source="bob", target="alice", amount=30) + "\n"
     + reply("transfer", source="bob", target="alice", amount=30).split("</think>\n")[1], 0.0),  # two calls
])
def test_tool_call_reward(completion, expected):
    assert REWARDS["tool_call"](TASK, completion) == expected
    assert TASK.reward(completion) == expected


def test_tool_call_reward_needs_the_expected_call():
    with pytest.raises(UserError, match="tool_call task needs"):
        REWARDS["tool_call"](Task("x", "", "tool_call", {"tools": TOOLS}), reply("transfer"))


def test_tool_tasks_render_their_tools_into_the_rollout_prompt():
    template = ChatTemplate(compact_chat_template())
    task = tool_tasks(1, seed=0)[0]
    text = render_task(template, task)
    assert task.meta["system"] in text and task.prompt in text
    assert all(f'"name": "{s["function"]["name"]}"' in text for s in task.meta["tools"])
    plain = Task("Compute 2 + 3.", "5", "arithmetic")  # a task without tools or system: the user turn only
    assert render_task(template, plain) == template.render([{"role": "user", "content": plain.prompt}])


# ---- eval items --------------------------------------------------------------------------------------

def _reference_prediction(domain: str, item: dict) -> dict:
    if domain == "math":
        return {"completion": f"ok\n</think>\n\\boxed{{{item['answer']}}}"}
    if domain == "code":
        return {"completion": f"\n</think>\n```python\n{item['solution']}```"}
    call = item["reference_calls"][0]
    return {"completion": [reply(call["name"], **call["arguments"]), item["reference_answer"]]}


@pytest.mark.parametrize("domain", DOMAINS)
def test_eval_items_are_solved_by_their_references_and_not_by_nonsense(domain, tmp_path):
    """The items the recipe writes load in the harness, and the harness (an independent scorer: sandbox, math
    verifier, simulated env episodes) accepts the reference and rejects a wrong answer."""
    data, preds, wrong = tmp_path / "items.jsonl", tmp_path / "preds.jsonl", tmp_path / "wrong.jsonl"
    tasks = domain_tasks(domain, 6, "test", seed=1)
    write_eval_set(str(data), domain, tasks)
    items = [json.loads(line) for line in data.read_text().splitlines()]
    preds.write_text("".join(json.dumps(_reference_prediction(domain, it)) + "\n" for it in items))
    wrong.write_text("".join(json.dumps({"completion": "\n</think>\n\\boxed{12345}"}) + "\n" for _ in items))
    for path, accuracy in ((preds, 1.0), (wrong, 0.0)):
        _, verdicts, _ = evaluate(EvalArgs(task=domain, data=str(data), predictions=str(path)))
        assert [v[0].correct for v in verdicts] == [accuracy == 1.0] * len(items), [v[0].reason for v in verdicts]


# ---- the MTP phase ------------------------------------------------------------------------------------

@pytest.fixture
def model(tiny_config):
    torch.manual_seed(0)
    return Step35ForCausalLM(tiny_config).float()


def test_clone_copies_module_1_exactly(model):
    layers = model.mtp_layers
    assert len(layers) == 3
    assert not torch.equal(layers[0].eh_proj.weight, layers[1].eh_proj.weight)
    src = {k: v.clone() for k, v in layers[0].state_dict().items()}
    clone_mtp_modules(model)
    for layer in layers:
        state = layer.state_dict()
        assert state.keys() == src.keys() and all(torch.equal(state[k], src[k]) for k in src)
    layers[1].eh_proj.weight.data.add_(1.0)  # copies, not shared tensors
    assert torch.equal(layers[0].eh_proj.weight, src["eh_proj.weight"])


def _batch(vocab: int):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(11, vocab, (3, 14), generator=g)
    mask = (torch.rand(3, 13, generator=g) < 0.6).float()
    return ids, mask


def test_masked_mtp_losses_match_the_teacher_forced_chain(model):
    """Against the model's own `mtp_logits` (the chain objective.py trains), masked by hand position by position."""
    ids, mask = _batch(model.config.vocab_size)
    inputs = ids[:, :-1]
    with torch.no_grad():
        h = model.trunk(inputs)
        got = masked_mtp_losses(model, ids, mask, h)
        chain = model.mtp_logits(inputs, h)
    assert len(got) == len(chain) == 3
    for j, logits in enumerate(chain):
        total, count = 0.0, 0
        for b in range(ids.shape[0]):
            for t in range(logits.shape[1]):
                if mask[b, t + 1 + j]:  # target ids[b, t + 2 + j] is a trained token
                    total += F.cross_entropy(logits[b, t][None], ids[b, t + 2 + j][None]).item()
                    count += 1
        assert got[j].item() == pytest.approx(total / count, rel=1e-5)


def test_mtp_phase_changes_only_mtp_weights_and_lowers_their_loss(model):
    ids, mask = _batch(model.config.vocab_size)
    examples = [(ids[i].tolist(), [0] + mask[i].long().tolist()) for i in range(3)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mtp_names = {f"model.layers.{model.num_layers + j}." for j in range(3)}
    clone_mtp_modules(model)
    losses = train_mtp_phase(model, examples, pad_id=0, steps=12, lr=3e-3, batch_size=3, log_every=0)
    assert losses[-1] < losses[0]
    after = model.state_dict()
    for name, value in after.items():
        if any(name.startswith(p) for p in mtp_names):
            continue
        assert torch.equal(value, before[name]), f"{name} changed"
    for j in range(3):
        w = f"model.layers.{model.num_layers + j}.eh_proj.weight"
        assert not torch.equal(after[w], before[w])
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again for whoever trains next


def test_distill_kl_matches_torch_kl_div():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.float32)
    per_pos = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="none", log_target=True).sum(-1)
    assert distill_kl(s, t, mask).item() == pytest.approx((per_pos * mask).sum().item() / mask.sum().item(), rel=1e-5)
    assert distill_kl(t, t, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_supervised_training_with_mtp_module_1_and_distillation(tiny_config):
    """The SFT/consolidation loss: CE and module-1 MTP loss fall, modules 2-3 stay put (depth weights [1, 0, 0]),
    and the KL term pulls the student towards a (sharp) teacher compared with the same run without it."""
    from stepflash.posttrain.recipe_train import supervised_loss, train_supervised

    torch.manual_seed(1)
    teacher = Step35ForCausalLM(tiny_config).float().eval()
    teacher.lm_head.weight.data.mul_(30)  # a peaked distribution to distil
    ids, mask = _batch(tiny_config.vocab_size)
    examples = {"a": [(ids[i].tolist(), [0] + mask[i].long().tolist()) for i in range(3)]}
    ends = {}
    for kl_weight in (0.0, 1.0):
        torch.manual_seed(0)
        student = Step35ForCausalLM(tiny_config).float()
        with torch.no_grad():
            _, start = supervised_loss(student, ids, mask, mtp_weight=0.3, teacher=teacher, kl_weight=1.0)
        frozen = {k: v.clone() for k, v in student.mtp_layers[1].state_dict().items()}
        train_supervised(student, examples, pad_id=0, steps=15, lr=3e-3, batch_size=3, mtp_weight=0.3,
                         teachers={"a": teacher}, kl_weight=kl_weight, log_every=0)
        with torch.no_grad():
            _, ends[kl_weight] = supervised_loss(student, ids, mask, mtp_weight=0.3, teacher=teacher, kl_weight=1.0)
        assert ends[kl_weight]["ce"] < start["ce"] and ends[kl_weight]["mtp"] < start["mtp"]
        assert all(torch.equal(v, frozen[k]) for k, v in student.mtp_layers[1].state_dict().items())
    assert ends[1.0]["kl"] < 0.9 * ends[0.0]["kl"]  # without the term the two runs would be identical


# ---- the recipe end to end -----------------------------------------------------------------------------

TINY = ["demo", "--train-tasks", "40", "--test-tasks", "3", "--sft-steps", "3", "--batch-size", "4",
        "--expert-steps", "1", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--distill-prompts", "3",
        "--distill-samples", "2", "--student-steps", "2", "--final-steps", "1", "--mtp-steps", "2",
        "--mtp-prompts", "3", "--max-new-tokens", "12", "--kl-weight", "0.5"]


@pytest.mark.slow
def test_tiny_recipe_end_to_end_and_resume(tmp_path, capsys):
    from stepflash import cli
    from stepflash.posttrain.recipe import STAGES

    out = str(tmp_path / "recipe")
    assert cli.main(["recipe", *TINY, "--out", out]) == 0
    first = capsys.readouterr().out
    for stage in STAGES:
        assert os.path.isfile(os.path.join(out, stage, "config.json")), stage
        assert os.path.isfile(os.path.join(out, stage, "tokenizer.json")), stage
        assert f"{stage}: start" in first
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert results["stages"] == list(STAGES) and results["domains"] == list(DOMAINS)
    for stage in STAGES:
        assert set(results["accuracy"][stage]) == {*DOMAINS, "tool_call"}
        assert all(0.0 <= v <= 1.0 for v in results["accuracy"][stage].values())
    # MTP speculative decoding (4_mtp is scored with --mtp 3) must not change greedy answers
    assert results["accuracy"]["4_mtp"] == results["accuracy"]["3_final_mispo"]
    assert set(results["mtp"]) >= {"before", "after_clone", "after"}
    assert "| 2_consolidated |" in open(os.path.join(out, "results.md")).read()
    # every stage is a checkpoint the harness loads (it scored each one) with the recipe's chat template
    from stepflash.chat import ChatTemplate as T
    assert T.from_checkpoint(os.path.join(out, "4_mtp")).source == compact_chat_template()

    assert cli.main(["recipe", *TINY, "--out", out]) == 0
    second = capsys.readouterr().out
    for stage in STAGES:
        assert f"{stage}: complete, skipped" in second and f"{stage}: start" not in second
    assert "correct, accuracy" not in second  # no eval re-run: the harness prints that line when it scores
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["accuracy"] == results["accuracy"]


def test_recipe_rejects_a_bad_start(tmp_path):
    from stepflash import cli

    assert cli.main(["recipe", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2


def test_mtp_verb_clones_trains_and_saves(rl_ckpt, tmp_path, capsys):
    """`stepflash mtp` (the MTP phase on its own): trunk outputs unchanged, MTP modules trained, a checkpoint."""
    import json

    import stepflash
    from stepflash.cli import main

    data = tmp_path / "convs.jsonl"
    with open(data, "w") as f:
        for i in range(24):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"say something {i}"},
                                             {"role": "assistant", "content": "ok " * (i % 5 + 1)}]}) + "\n")
    out = tmp_path / "mtp"
    assert main(["mtp", rl_ckpt, "--data", str(data), "--out", str(out), "--steps", "3", "--batch-size", "4",
                 "--eval-prompts", "4", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "mean accepted drafts (k=3)" in printed and "mtp phase done after 3 steps" in printed
    before, after = stepflash.load_model(rl_ckpt).state_dict(), stepflash.load_model(str(out)).state_dict()
    n = stepflash.load_model(rl_ckpt).config.num_hidden_layers
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(tuple(f"model.layers.{n + j}." for j in range(3))) for k in changed)
