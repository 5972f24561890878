"""The test driver that runs INSIDE the sandbox (its text is shipped as driver.py; stepflash never imports it).

It executes solution.py as module "solution", then for each test runs its steps in that namespace:
("exec", statement) runs a setup statement, ("probe", [expression, ...]) evaluates the expressions and keeps
their values. Per test it writes one line to fd 3: repr((i, "values", [[encoded, ...], ...])) or
repr((i, "error", "ExceptionName: message")); (-1, "error", ...) when solution.py itself fails. The parent
(`code_checks.py`) compares the values with the expected ones, which never come here.

Values are encoded as tagged tuples of str, int, bool and None (repr'd, read back with ast.literal_eval):
("i", hex), ("f", float.hex), ("c", re.hex, im.hex), ("s", str), ("b"/"ba", bytes.hex), ("l"/"t"/"set"/"fs",
[items]), ("d", [[key, value], ...]), and ("?", type name, truthiness) for anything else. Subclasses of the plain
types (a namedtuple, an IntEnum) are encoded as their base type's content. Only the standard library's
builtins and `os` are used: nothing to import costs time in every sandbox run.
"""

import os

SPEC = None  # replaced by the parent: one list of steps per test
MAX_DEPTH = 100


def encode(value, depth=0):
    if depth > MAX_DEPTH:
        raise ValueError("the result is nested too deeply")
    d = depth + 1
    if value is None or value is True or value is False:
        return value
    if isinstance(value, int):
        return ("i", hex(int.__index__(value)))
    if isinstance(value, float):
        return ("f", float.hex(float.__float__(value)))
    if isinstance(value, complex):
        return ("c", float.hex(value.real), float.hex(value.imag))
    if isinstance(value, str):
        return ("s", str.__str__(value))
    if isinstance(value, (bytes, bytearray)):
        return ("ba" if isinstance(value, bytearray) else "b", bytes(value).hex())
    if isinstance(value, (list, tuple, set, frozenset)):
        tag = "l" if isinstance(value, list) else "t" if isinstance(value, tuple) else \
            "fs" if isinstance(value, frozenset) else "set"
        base = list if tag == "l" else tuple if tag == "t" else frozenset if tag == "fs" else set
        return (tag, [encode(v, d) for v in base.__iter__(value)])
    if isinstance(value, dict):
        return ("d", [[encode(k, d), encode(v, d)] for k, v in dict.items(value)])
    try:
        truthy = bool(value)
    except BaseException:
        truthy = True
    return ("?", type(value).__name__, truthy)


def last_line(exc):
    """The last line Python prints for an uncaught exception: "ValueError: boom"."""
    try:
        message = str(exc)
    except BaseException:
        message = ""
    name = type(exc).__name__
    return f"{name}: {message}" if message else name


def send(item):
    data = (repr(item) + "\n").encode()
    while data:
        data = data[os.write(3, data):]


def main():
    namespace = {"__name__": "solution"}
    try:
        with open("solution.py", encoding="utf-8") as f:
            source = f.read()
        exec(compile(source, "solution.py", "exec"), namespace)
    except BaseException as e:
        send((-1, "error", last_line(e)))
        return
    for i, steps in enumerate(SPEC):
        values = []
        try:
            for kind, body in steps:
                if kind == "exec":
                    exec(compile(body, f"<test {i}>", "exec"), namespace)
                else:
                    values.append([encode(eval(compile(p, f"<test {i}>", "eval"), namespace)) for p in body])
        except BaseException as e:
            send((i, "error", last_line(e)))
            continue
        send((i, "values", values))


if __name__ == "__main__":
    main()
