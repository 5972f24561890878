import pytest
import torch

from stepflash.config import tiny


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config():
    return tiny()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine they oversubscribe.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A small corpus with structure (a fixed 'grammar' of words) prepared with a 256-token vocab."""
    import random

    from stepflash.training.data import PrepareArgs, prepare

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "def class return import self for in if else while print lambda yield with as try".split()
    for i in range(30):
        lines = [f"{(w := rng.choice(words))} x{rng.randint(0, 9)} = {w}({rng.randint(0, 9)})" for _ in range(30)]
        (root / f"{i:02d}.py").write_text("\n".join(lines) + "\n")
    out = tmp_path_factory.mktemp("data")
    prepare(PrepareArgs(input=str(root), out=str(out), vocab_size=256, val_fraction=0.1, docs_per_shard=8,
                        progress=False))
    return str(out)


@pytest.fixture(scope="session")
def rl_ckpt(tmp_path_factory):
    """A random `tiny` model with a small task tokenizer, saved as a checkpoint (for the RL trainer)."""
    from stepflash.chat import render_chat
    from stepflash.checkpoint.run import save_model_dir
    from stepflash.posttrain.sft import load_start

    texts = [render_chat([{"role": "user", "content": f"say something {i}"}, {"role": "assistant", "content": "ok"}],
                         add_generation_prompt=False) for i in range(50)]
    model, tok = load_start("tiny", texts, seed=0)
    path = str(tmp_path_factory.mktemp("rl") / "ckpt")
    save_model_dir(model, tok, path)
    return path
