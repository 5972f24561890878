"""Verifiers on right, wrong and malicious completions; the Bradley-Terry reward model and preference reward."""

import json
import threading

import pytest
import torch

from stepflash import cli
from stepflash.config import tiny
from stepflash.errors import UserError
from stepflash.model import Step35ForCausalLM
from stepflash.tasks.rewards import REWARDS, get_reward, strip_reasoning, task_field
from stepflash.tasks.rewards.countdown import countdown_reward, safe_eval
from stepflash.tasks.rewards.math_verifier import answers_match, extract_answer, math_reward
from stepflash.posttrain.preference import PreferenceReward
from stepflash.posttrain.reward_model import RewardModel, bt_loss, collate, train_step

# ---- math ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("completion,expected", [
    ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("Work...\nAnswer: $0.5$.", "0.5"),
    ("we get 3 apples and then 12,000 pears", "12000"),
    ("<think>maybe \\boxed{7}</think>The final answer is 8", "8"),
    ("no digits here", None),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize("reference,completion", [
    ("1/2", "\\boxed{\\frac{1}{2}}"),
    ("1/2", "\\boxed{0.5}"),
    ("\\frac{1}{2}", "Answer: 1/2"),
    ("0.25", "\\boxed{\\frac14}"),
    ("\\sqrt{2}", "\\boxed{2^{1/2}}"),
    ("\\{1, 2, 3\\}", "\\boxed{\\{3, 1, 2\\}}"),
    ("(0, 1]", "\\boxed{(0,1]}"),
    ("-8591", "so 771 - 9362 = -8591"),
    ("12345678901234567890", "\\boxed{12345678901234567890}"),
])
def test_math_right(reference, completion):
    assert math_reward({"answer": reference}, completion) == 1.0


@pytest.mark.parametrize("reference,completion", [
    ("1/2", "\\boxed{\\frac{1}{3}}"),
    ("1/2", "\\boxed{0.51}"),
    ("(0, 1]", "\\boxed{(0,1)}"),
    ("[0, 1]", "\\boxed{(0,1]}"),
    ("\\{1, 2, 3\\}", "\\boxed{\\{1, 2\\}}"),
    ("7", "<think>the answer is 7</think>The answer is 8"),  # only the final answer counts
    ("7", "I have no idea"),
])
def test_math_wrong(reference, completion):
    assert math_reward({"answer": reference}, completion) == 0.0


def test_math_prompt_asking_for_boxed_credits_only_a_boxed_answer():
    # The hack RL found on arithmetic: stop mid-reasoning on a number that equals the answer.
    task = {"prompt": "Compute 0 + 3. Put the final answer in \\boxed{}.", "answer": "3"}
    assert math_reward(task, "0 + 3 = }") == 0.0
    assert math_reward(task, "The answer is 3") == 0.0
    assert math_reward(task, "0 + 3 = 3\n</think>\n\\boxed{3}") == 1.0
    assert math_reward({"prompt": "Compute 0 + 3.", "answer": "3"}, "The answer is 3") == 1.0  # no format asked


@pytest.mark.parametrize("garbage", [
    "", "\\boxed{", "}}}{{{", "\\boxed{\\frac{1}{0}}", "\\boxed{" + "(" * 500 + "}", "\x00\xff\ud800", "9" * 5000,
    "\\boxed{\\begin{matrix}}", "Answer: \\\\\\\\", "\\boxed{x^{x^{x^{x^{x}}}}}",
])
def test_math_never_raises_on_garbage(garbage):
    assert math_reward({"answer": "3"}, garbage) == 0.0


def test_math_works_outside_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(answers_match("0.5", "\\frac{1}{2}")))
    thread.start()
    thread.join()
    assert results == [True]


def test_math_task_without_reference_is_a_user_error():
    with pytest.raises(UserError):
        math_reward({"prompt": "what?"}, "\\boxed{1}")


# ---- code: tests/test_code_reward.py (verdicts, forging, hostile programs through the reward) --------


# ---- countdown ----------------------------------------------------------------------------------

CD = {"numbers": [3, 7, 25, 50], "target": 175}


@pytest.mark.parametrize("completion,reward", [
    ("\\boxed{(50 - 25) * 7}", 1.0),
    ("Answer: 7 * 25", 1.0),
    ("Let me think.\n(50 - 25) × 7 = 175", 1.0),
    ("\\boxed{7 * 25 + 3 - 3}", 0.0),  # 3 used twice
    ("\\boxed{175}", 0.0),  # a number that was not given
    ("\\boxed{7 * 25 + 3}", 0.0),  # wrong value
    ("\\boxed{50 / (25 - 25)}", 0.0),  # division by zero (and 25 twice)
    ("\\boxed{__import__('os').system('touch /tmp/pwned')}", 0.0),
    ("\\boxed{-7 * -25}", 0.0),  # unary minus is not an allowed operation
    ("\\boxed{7 ** 25}", 0.0),
    ("nothing", 0.0),
])
def test_countdown(completion, reward):
    assert countdown_reward(CD, completion) == reward


def test_safe_eval_is_exact():
    value, used = safe_eval("(7 / 3) * 3")
    assert value == 7 and used == [7, 3, 3]


# ---- registry -----------------------------------------------------------------------------------


def test_registry_and_task_fields():
    assert set(REWARDS) >= {"math", "arithmetic", "code", "countdown"}
    with pytest.raises(UserError, match="unknown reward"):
        get_reward("vibes")
    assert task_field({"meta": {"target": 3}}, "target") == 3
    assert strip_reasoning("<think>a</think>b</think>c") == "c" and strip_reasoning("plain") == "plain"


# ---- reward model and preference reward ---------------------------------------------------------


class ByteTokenizer:
    """Stand-in for a `tokenizers.Tokenizer` (encode(...).ids), one id per byte, ids < 256."""

    class _Enc:
        def __init__(self, ids):
            self.ids = ids

    def encode(self, text, add_special_tokens=False):
        return self._Enc(list(text.encode("utf-8")))

    def token_to_id(self, token):
        return None


def _rm():
    torch.manual_seed(0)
    return RewardModel(Step35ForCausalLM(tiny()))


def test_score_reads_the_last_real_token_and_ignores_padding():
    rm = _rm()
    torch.nn.init.normal_(rm.value_head.proj.weight)
    a, b = [5, 6, 7, 8, 9], [5, 6, 7]
    ids, mask = collate([a, b], pad_id=0)
    batched = rm(ids, mask)
    alone = torch.cat([rm(torch.tensor([a])), rm(torch.tensor([b]))])
    assert torch.allclose(batched, alone, atol=1e-5)
    h = rm.model.model.norm(rm.model.trunk(torch.tensor([b])))[0, -1]
    assert batched[1].item() == pytest.approx((h @ rm.value_head.proj.weight[0] + rm.value_head.proj.bias).item(),
                                              abs=1e-5)


def test_bt_loss_formula():
    c, r = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    expected = -(torch.sigmoid(torch.tensor(1.0)).log() + torch.sigmoid(torch.tensor(-1.0)).log()) / 2
    assert bt_loss(c, r).item() == pytest.approx(expected.item())


def test_bt_loss_decreases_on_a_toy_preference_set():
    rm = _rm()
    tok = ByteTokenizer()
    pairs = [{"prompt": f"q{i}", "chosen": "yes " * (i + 1), "rejected": "no " * (i + 1)} for i in range(4)]
    opt = torch.optim.AdamW([{"params": rm.value_head.parameters(), "lr": 1e-2},
                             {"params": rm.model.parameters(), "lr": 1e-3}])
    losses = [train_step(rm, opt, pairs, tok, max_len=24, device="cpu")[0] for _ in range(8)]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # zero head: r_c = r_r
    assert losses[-1] < 0.3 * losses[0]


def test_preference_reward_is_sigmoid_of_score_difference():
    rm = _rm()
    torch.nn.init.normal_(rm.value_head.proj.weight)
    reward = PreferenceReward(rm, ByteTokenizer())
    task = {"prompt": "Say something nice.", "answer": "You are great."}
    completion = "<think>hmm</think>Nice weather today."
    scores = reward.scores([task["prompt"]] * 2, ["Nice weather today.", "You are great."])
    expected = torch.sigmoid(scores[0] - scores[1]).item()
    assert reward(task, completion) == pytest.approx(expected, abs=1e-6)
    assert reward(task, "You are great.") == pytest.approx(0.5)
    REWARDS["preference"] = reward
    try:
        assert get_reward("preference")(task, completion) == pytest.approx(expected, abs=1e-6)
    finally:
        del REWARDS["preference"]


def test_rm_train_verb_end_to_end(tmp_path):
    from stepflash.checkpoint import save_model
    from stepflash.tokenizer import train_tokenizer

    ckpt, out = tmp_path / "base", tmp_path / "rm"
    save_model(Step35ForCausalLM(tiny()), str(ckpt))
    texts = ["the cat sat on the mat", "good answer", "bad answer", "please help"] * 20
    tok = train_tokenizer(texts, vocab_size=256, out_path=str(ckpt))
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "please help", "chosen": "good answer", "rejected": "bad answer"}] * 4
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rc = cli.main(["rm", "train", str(ckpt), "--data", str(data), "--out", str(out), "--epochs", "3",
                   "--batch-size", "4", "--lr", "1e-3", "--head-lr", "1e-2", "--log-every", "1"])
    assert rc == 0
    assert (out / "value_head.safetensors").exists() and (out / "tokenizer.json").exists()
    rm = RewardModel.load(str(out))
    reward = PreferenceReward(rm, tok)
    assert reward({"prompt": "please help", "answer": "bad answer"}, "good answer") > 0.5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "y"}\n')
    assert cli.main(["rm", "train", str(ckpt), "--data", str(bad), "--out", str(out)]) == 2
