"""azr's tests, CPU only: the executor against real adversarial programs and the real data files, the model
against transformers' own implementation, the Triton kernels (interpreter mode) against float64, and the
self-play loop end to end with the tiny model and the real executor.

Run: python -m pytest -q test_azr.py"""
import os

import torch  # does not import triton

if not torch.cuda.is_available():  # Triton runs on the CPU only in interpreter mode, set before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
SHARED_DATA = next((p / "shared" / "data" for p in REPO.parents if (p / "shared" / "data").is_dir()), None)
SEED_SAMPLE = REPO / "data" / "sample_seed_io.jsonl"  # travels with the repository (data/README.md)

import azr  # noqa: E402
import executor as executor_module  # noqa: E402
import kernels  # noqa: E402
import model as M  # noqa: E402
from executor import Executor, Result, parse_args, parse_value, values_equal  # noqa: E402
from kernels import fused_logprobs, reference  # noqa: E402


def shared_data(name: str) -> Path:
    """A file of ../shared/data (CRUXEval, upstream's full seed files), or skip: a machine that has only the
    repository (the GPU box) lacks it."""
    if SHARED_DATA is None or not (SHARED_DATA / name).is_file():
        pytest.skip(f"needs ../shared/data/{name}, which is absent here (only the repository travelled)")
    return SHARED_DATA / name


# ==============================================================================================================
# executor.py: sandbox, value semantics, real data (issue 2)
# ==============================================================================================================

_EXEC_SECRET = "AZR_EXEC_TEST_SECRET"


# ------------------------------------------------------------------------------------------ value semantics

@pytest.mark.parametrize("text, expected", [
    ("1", 1), ("-1 * 10**9", -10**9), ("'a' 'b'", "ab"), ("b'x'", b"x"), ("1.5e3", 1500.0), ("2+3j", 2 + 3j),
    ("[1, (2,), {3}, {'k': None}]", [1, (2,), {3}, {"k": None}]), ("dict(a=1, b=2)", {"a": 1, "b": 2}),
    ("set()", set()), ("frozenset({1, 2})", frozenset({1, 2})), ("tuple([1, 2])", (1, 2)), ("list('ab')", ["a", "b"]),
    ("(1, )", (1,)), ("True", True), ("~5 // 2", -3), ("1 << 10", 1024), ("  [1]\n", [1]), ("'x' * 3", "xxx"),
])
def test_exec_parse_value_accepts(text, expected):
    assert values_equal(parse_value(text), expected)


@pytest.mark.parametrize("text", [
    "__import__('os').system('id')", "x", "f(1)", "len([1])", "lambda: 1", "[1][0]", "'a'.upper()",
    "{**{}}", "[*[1]]", "10**10**9", "1 << 10**9", "'x' * 10**9", "[0] * 10**8", "'%s' % 1", "1/0",
    "{[1]: 2}", "set([[1]])", "...", "inf", "nan", "[" * 300 + "]" * 300, "1" * 5000, "0x" + "f" * 5000,
    "[[0] * 999999] * 2 + [[0] * 999999]", "list(1)", "dict(1, a=2)", "1 if 1 else 2", "(yield)", "",
])
def test_exec_parse_value_rejects(text):
    with pytest.raises(ValueError) as info:
        parse_value(text)
    assert "\n" not in str(info.value)  # one-line reason


@pytest.mark.parametrize("text", [
    "[[[[0]*1000]*1000]*1000]*1000", "[[0]*10**4]*10**4", "dict(a=[[0]*1000]*1000)", "(('x'*1000,)*1000,)*1000",
    "[('ab'*500, 1)*500]*1000", "set([(0,)*1000]*1000)", "frozenset({((0,)*1000,)*1000})", "['x'*1000]*1001",
    "[[0]*999]*999 + [[0]*999]*999", "{1: [[0]*1000]*1000}", "tuple([[0]*1000])*1000",
])
def test_exec_parse_value_counts_repeated_references(text):
    """Repetition copies references: `[[0]*1000]*1000` holds a million cells that walking it (values_equal,
    hashing) visits, though it allocates two thousand. Such values must fail fast, not hang the trainer."""
    with pytest.raises(ValueError, match="over 1000000 elements"):
        parse_value(text)


@pytest.mark.parametrize("text, expected", [
    ("[[0] * 3] * 2", [[0, 0, 0], [0, 0, 0]]), ("[(1, 'ab')] * 3", [(1, "ab")] * 3),
    ("dict(a=[[0] * 10] * 10)", {"a": [[0] * 10 for _ in range(10)]}), ("('x' * 100,) * 100", ("x" * 100,) * 100),
])
def test_exec_parse_value_accepts_small_repetition(text, expected):
    assert values_equal(parse_value(text), expected)


def test_exec_parse_args():
    assert parse_args("1, [2], k=3") == ((1, [2]), {"k": 3})
    assert parse_args("'John', {'age': 20}") == (("John", {"age": 20}), {})
    assert parse_args("") == ((), {})
    assert parse_args("[1,\n 2],  # a comment\n 3") == (([1, 2], 3), {})
    for bad in ["1), g(2", "1) + (2", "*[1]", "**{'a': 1}", "a=1, a=2", "x)(1", "print('hi')", "1, lambda: 0",
                "f(1)", "1; import os"]:
        with pytest.raises(ValueError):
            parse_args(bad)


@pytest.mark.parametrize("a, b, equal", [
    (True, 1, False), (1, 1.0, False), (0, False, False), ([1], (1,), False), ({1, 2}, {2, 1}, True),
    ({"a": 1, "b": 2}, {"b": 2, "a": 1}, True), ({"a": 1}, {"a": True}, False), (0.1 + 0.2, 0.3, False),
    (float("nan"), float("nan"), True), (0.0, -0.0, True), ([{1: (2, [3])}], [{1: (2, [3])}], True),
    (frozenset({1}), {1}, False), ({(1, "a")}, {(1, "a")}, True), ({1: "x"}, {True: "x"}, False),
    ("1", 1, False), (None, None, True), (b"a", "a", False), (1 + 2j, 1 + 2j, True),
])
def test_exec_values_equal(a, b, equal):
    assert values_equal(a, b) is equal and values_equal(b, a) is equal


def test_exec_values_equal_never_calls_user_code():
    class Liar:
        def __eq__(self, other):
            raise AssertionError("user __eq__ called")
        __hash__ = object.__hash__
    x = Liar()
    assert values_equal(x, x) and not values_equal(x, Liar()) and not values_equal([x], [1])


# ------------------------------------------------------------------------------------------ the sandbox

@pytest.fixture(scope="module")
def ex():
    os.environ[_EXEC_SECRET] = "hunter2"  # must never reach a task
    with Executor(workers=2, timeout=2.0, memory_mb=512) as executor:
        yield executor
    del os.environ[_EXEC_SECRET]


@pytest.fixture(scope="module")
def world():
    """Out-of-band observers: a canary dir, TCP/UDP/abstract-unix listeners, a sibling process."""
    canary = Path(tempfile.mkdtemp(prefix="azr-exec-canary-"))
    (canary / "keep.txt").write_text("keep")
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    unix_name = f"\0azr-exec-test-{os.getpid()}"
    unix.bind(unix_name)
    unix.listen(8)
    sibling = subprocess.Popen(["sleep", "600"])
    yield dict(canary=str(canary), tcp=tcp, udp=udp, unix=unix, unix_name=unix_name, sibling=sibling,
               tcp_port=tcp.getsockname()[1], udp_port=udp.getsockname()[1], sibling_pid=sibling.pid,
               trainer_pid=os.getpid(), test_file=str(Path(__file__).resolve()))
    sibling.kill()
    sibling.wait()
    for s in (tcp, udp, unix):
        s.close()
    shutil.rmtree(canary)


def _exec_zygotes(executor):
    return [z for s in executor.slots for z in (s.canonical, s.probe) if z.proc is not None]


def _exec_zygote_pid(z) -> int:
    """The process that forks z's tasks: the child of the launched one when that had to fork into a new PID
    (or time) namespace."""
    if "pidns" not in z.hello["layers"] and z.hello["clock"] != "offset":
        return z.proc.pid
    return int(Path(f"/proc/{z.proc.pid}/task/{z.proc.pid}/children").read_text().split()[0])


def _exec_task_root(z) -> Path:
    """Where z makes task dirs, as this process sees it: /task inside a private root, else its dir on tmpfs."""
    return Path(f"/proc/{_exec_zygote_pid(z)}/root/task") if "mountns" in z.hello["layers"] else Path(z.base_dir)


def _exec_strays(executor):
    """Processes forked from this executor's zygotes (their cmdline names the zygote's base dir) still alive."""
    zygotes = _exec_zygotes(executor)
    marks = [z.base_dir.encode() for z in zygotes]
    pids = {z.proc.pid for z in zygotes} | {_exec_zygote_pid(z) for z in zygotes}
    strays = []
    for p in os.listdir("/proc"):
        if p.isdigit() and int(p) not in pids:
            try:
                cmd = Path(f"/proc/{p}/cmdline").read_bytes()
            except OSError:
                continue
            if any(m in cmd for m in marks):
                strays.append(int(p))
    return strays


def _exec_idle(executor) -> bool:
    return not _exec_strays(executor) and all(not any(_exec_task_root(z).iterdir()) for z in _exec_zygotes(executor))


def _exec_wait(cond, tries=500):
    """Poll `cond` every 10 ms, at most `tries` times; the caller asserts what it needs afterwards."""
    for _ in range(tries):
        if cond():
            return
        select.select([], [], [], 0.01)


def _exec_assert_contained(executor, world, zygote_pids):
    """Zygotes answer before they clean up, and clean up before their next task: wait for that. Twice, more
    than a spare child's idle life apart: without isolating layers a worker forks the spare only after the
    cleanup, so for an instant in between it looks idle."""
    for _ in range(2):
        _exec_wait(lambda: _exec_idle(executor))
        select.select([], [], [], 4 * executor_module._IDLE_S)
    canary = Path(world["canary"])
    assert sorted(os.listdir(canary)) == ["keep.txt"] and (canary / "keep.txt").read_text() == "keep"
    assert not Path("/azr-exec-pwned").exists()
    assert select.select([world["tcp"], world["udp"], world["unix"]], [], [], 0.05)[0] == [], "a listener got traffic"
    assert world["sibling"].poll() is None, "the sibling process was killed"
    assert [z.proc.pid for z in _exec_zygotes(executor)] == zygote_pids, "a zygote died"
    assert all(z.proc.poll() is None for z in _exec_zygotes(executor))
    assert _exec_strays(executor) == [], "processes outlived their task"
    assert all(not any(_exec_task_root(z).iterdir()) for z in _exec_zygotes(executor)), "a task dir was left behind"


def _p(src):
    return textwrap.dedent(src).strip() + "\n"


# (id, layers of which one must be active, allowed statuses, substring of error or exact value, program, inputs)
_EXEC_ANY_NET = ("netns", "seccomp", "landlock")
_EXEC_CASES = [
    ("infinite_loop", None, {"timeout"}, None, "def f(x):\n    while True:\n        pass", "0"),
    ("sleep", None, {"timeout"}, None, "import time\ndef f(x):\n    time.sleep(10 ** 6)", "0"),
    ("regex_backtracking", None, {"timeout"}, None, "import re\ndef f(x):\n    return re.match('(a+)+$', 'a' * 64 + 'b')", "0"),
    ("bigint_c_level", None, {"timeout", "memory"}, None, "def f(x):\n    return 10 ** (10 ** 9) % 7", "0"),
    ("bytearray_bomb", None, {"memory"}, None, "def f(x):\n    return len(bytearray(10 ** 11))", "0"),
    # touching the whole 512 MB budget can outlast 2 s on a loaded 2-core machine: either outcome is safe
    ("list_growth", None, {"memory", "timeout"}, None, "def f(x):\n    a = []\n    while True:\n        a.append(bytearray(10 ** 7))", "0"),
    ("print_flood", None, {"timeout"}, None, "def f(x):\n    while True:\n        print('x' * 100000)", "0"),
    ("print_then_return", None, {"ok"}, "=3", "def f(x):\n    for _ in range(1000):\n        print('y' * 1000)\n    return x + 1", "2"),
    ("huge_return", None, {"memory", "output_limit"}, None, "def f(x):\n    return 'x' * (3 * 10 ** 8)", "0"),
    ("long_return", None, {"output_limit"}, "OutputLimit", "def f(x):\n    return 'x' * 1000", "0"),
    ("int_over_4300_digits", None, {"error"}, "ValueError", "def f(x):\n    return 10 ** 5000", "0"),
    ("write_outside", ("landlock", "uid", "mountns"), {"error"}, "PermissionError|FileNotFoundError", "def f(d):\n    open(d + '/pwned.txt', 'w').write('x')", "{canary!r}"),
    ("delete_outside", ("landlock", "uid", "mountns"), {"error"}, "PermissionError|FileNotFoundError", "import os\ndef f(d):\n    os.remove(d + '/keep.txt')", "{canary!r}"),
    ("chdir_root_write", ("landlock", "uid"), {"error"}, "Error", "import os\ndef f(x):\n    os.chdir('/')\n    open('azr-exec-pwned', 'w')", "0"),
    ("write_read_cwd", None, {"ok"}, "='hello'", "def f(x):\n    open('a.txt', 'w').write('hello')\n    return open('a.txt').read()", "0"),
    ("big_file_cwd", None, {"error"}, "File too large", "def f(x):\n    open('big', 'wb').write(bytes(50 * 2 ** 20))", "0"),
    ("many_files_cwd", None, {"ok"}, "=2000", "import os\ndef f(n):\n    for i in range(n):\n        open(f'{i}.txt', 'w').close()\n    return len(os.listdir('.'))", "2000"),
    ("many_fds", None, {"error"}, "Too many open files", "def f(x):\n    return [open(f'{i}', 'w') for i in range(100)]", "0"),
    ("read_etc_passwd", ("landlock", "mountns"), {"error"}, "PermissionError|FileNotFoundError", "def f(x):\n    return open('/etc/passwd').read()[:10]", "0"),
    ("read_project_file", ("landlock", "mountns"), {"error"}, "PermissionError|FileNotFoundError", "def f(p):\n    return open(p).read()[:10]", "{test_file!r}"),
    ("environ_secret", None, {"ok"}, "=None", f"import os\ndef f(x):\n    return os.environ.get('{_EXEC_SECRET}')", "0"),
    ("environ_minimal", None, {"ok"}, "=['LANG', 'OMP_NUM_THREADS', 'PATH', 'PYTHONHASHSEED', 'TZ']", "import os\ndef f(x):\n    return sorted(os.environ)", "0"),
    ("tcp_connect", _EXEC_ANY_NET, {"error"}, None, "import socket\ndef f(port):\n    socket.create_connection(('127.0.0.1', port), timeout=1)", "{tcp_port}"),
    ("udp_send", ("netns", "seccomp"), {"error"}, None, "import socket\ndef f(port):\n    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', port))", "{udp_port}"),
    ("abstract_unix_connect", _EXEC_ANY_NET, {"error"}, None, "import socket\ndef f(name):\n    socket.socket(socket.AF_UNIX).connect(name)", "{unix_name!r}"),
    ("os_system", ("seccomp", "landlock"), {"ok", "error"}, "!0", "import os\ndef f(d):\n    return os.system('touch ' + d + '/pwned')", "{canary!r}"),
    ("subprocess_run", ("seccomp",), {"error"}, "PermissionError", "import subprocess\ndef f(x):\n    return subprocess.run(['true']).returncode", "0"),
    ("ctypes_system", ("seccomp", "landlock"), {"ok", "error"}, "!0", "import ctypes\ndef f(d):\n    return ctypes.CDLL(None).system(('touch ' + d + '/pwned').encode())", "{canary!r}"),
    ("subclasses_walk", ("seccomp", "landlock"), {"ok", "error"}, "!0", _p("""
        def f(d):
            for c in ().__class__.__base__.__subclasses__():
                if c.__name__ == '_wrap_close':
                    return c.__init__.__globals__['system']('touch ' + d + '/pwned')
            return 'not found'"""), "{canary!r}"),
    ("import_trick", None, {"ok"}, None, "def f(x):\n    return __import__('o' + 's').getcwd()", "0"),
    ("fork_once", None, {"ok", "error"}, None, _p("""
        import os, time
        def f(x):
            if os.fork() == 0:
                time.sleep(30)
                os._exit(0)
            return 1"""), "0"),
    ("setsid_double_fork", None, {"ok", "error"}, None, _p("""
        import os, time
        def f(x):
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    time.sleep(30)
                os._exit(0)
            return 1"""), "0"),
    ("fork_storm_200", None, {"ok", "error"}, None, _p("""
        import os, time
        def f(n):
            for _ in range(n):
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
            return n"""), "200"),
    ("fork_bomb", ("seccomp", "uid"), {"error", "timeout", "crash"}, None, "import os\ndef f(x):\n    while True:\n        os.fork()", "0"),
    ("raise_rlimit", ("seccomp", "uid", "nocaps"), {"error"}, None, "import resource\ndef f(x):\n    inf = resource.RLIM_INFINITY\n    resource.setrlimit(resource.RLIMIT_AS, (inf, inf))", "0"),
    ("raise_cpu_limit", ("uid", "nocaps"), {"error"}, "ValueError", "import resource\ndef f(x):\n    inf = resource.RLIM_INFINITY\n    resource.setrlimit(resource.RLIMIT_CPU, (inf, inf))", "0"),
    ("kill_zygote", ("landlock", "seccomp", "uid"), {"error"}, "PermissionError", "import os, signal\ndef f(x):\n    os.kill(os.getppid(), signal.SIGKILL)", "0"),
    ("signal_trainer", ("landlock", "seccomp", "uid"), {"error"}, "PermissionError", "import os\ndef f(pid):\n    os.kill(pid, 0)", "{trainer_pid}"),
    ("kill_sibling", ("landlock", "seccomp", "uid"), {"error"}, "PermissionError", "import os, signal\ndef f(pid):\n    os.kill(pid, signal.SIGKILL)", "{sibling_pid}"),
    ("proc_ppid_mem", ("landlock", "uid"), {"error"}, "Error", "import os\ndef f(x):\n    open(f'/proc/{os.getppid()}/mem', 'r+b')", "0"),
    ("ignore_signals_spin", None, {"timeout"}, None, _p("""
        import signal
        def f(x):
            for s in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT):
                signal.signal(s, signal.SIG_IGN)
            while True:
                pass"""), "0"),
    ("sys_exit", None, {"error"}, "SystemExit", "import sys\ndef f(x):\n    sys.exit(0)", "0"),
    ("os_exit", None, {"crash"}, None, "import os\ndef f(x):\n    os._exit(0)", "0"),
    ("base_exception", None, {"error"}, "BaseException", "def f(x):\n    raise BaseException('boom')", "0"),
    ("keyboard_interrupt", None, {"error"}, "KeyboardInterrupt", "def f(x):\n    raise KeyboardInterrupt", "0"),
    ("recursion", None, {"error"}, "RecursionError", "def f(x):\n    return f(x + 1)", "0"),
    ("recursion_limit_raised", None, {"timeout", "memory", "crash", "error"}, None, _p("""
        import sys
        def f(x):
            sys.setrecursionlimit(10 ** 7)
            def g(n):
                return g(n + 1) + 1
            return g(0)"""), "0"),
    ("lingering_thread", None, {"ok", "error"}, None, "import threading, time\ndef f(x):\n    threading.Thread(target=time.sleep, args=(100,)).start()\n    return 'done'", "0"),
    ("input_call", None, {"error"}, "EOFError", "def f(x):\n    return input()", "0"),
    ("closed_stdio_spin", None, {"timeout"}, None, "import os\ndef f(x):\n    os.close(1)\n    os.close(2)\n    while True:\n        pass", "0"),
    ("forged_frame", None, {"crash"}, "malformed", _p("""
        import json, os, struct
        def f(x):
            body = json.dumps({'status': 'ok', 'value': "__import__('os').system('id')", 'error': None}).encode()
            for fd in range(3, 64):
                try:
                    os.write(fd, struct.pack('>I', len(body)) + body)
                except OSError:
                    pass
            while True:
                pass"""), "0"),
    ("poison_builtins", None, {"ok"}, "=[42]", "import builtins\nbuiltins.sorted = lambda *a, **k: [42]\ndef f(x):\n    return sorted(x)", "[3, 1]"),
    ("repr_sleeps", None, {"timeout"}, None, "import time\nclass A:\n    def __repr__(self):\n        time.sleep(100)\n        return '1'\ndef f(x):\n    return A()", "0"),
    ("repr_raises", None, {"error"}, "RuntimeError", "class A:\n    def __repr__(self):\n        raise RuntimeError('no repr')\ndef f(x):\n    return A()", "0"),
    ("eq_always_true", None, {"error"}, "OutputNotAValue", "class A:\n    def __eq__(self, o):\n        return True\n    def __repr__(self):\n        return '1'\ndef f(x):\n    return A()", "0"),
    ("self_referential", None, {"error"}, "OutputNotAValue", "def f(x):\n    a = [1]\n    a.append(a)\n    return a", "0"),
    ("generator_return", None, {"error"}, "OutputNotAValue", "def f(x):\n    return (i for i in range(3))", "0"),
    ("nan_return", None, {"error"}, "OutputNotAValue", "def f(x):\n    return float('nan')", "0"),
    ("no_f", None, {"error"}, "NameError", "def g(x):\n    return x", "0"),
    ("syntax_error", None, {"error"}, "SyntaxError", "def f(x) return x", "0"),
    ("forged_deep_frame", None, {"crash"}, "malformed", _p("""
        import os, struct
        def f(x):
            body = b'[' * 60000  # past the trainer's JSON recursion limit
            for fd in range(3, 64):
                try:
                    os.write(fd, struct.pack('>I', len(body)) + body)
                except OSError:
                    pass
            while True:
                pass"""), "0"),
    # SIGIO: an fd's owner gets a signal (here SIGKILL) when the fd is ready; renicing and pinning others
    ("signal_or_renice_others", ("seccomp",), {"ok"}, "=[]", _p("""
        import fcntl, os, struct, ctypes
        def f(pid):
            done = []
            r, w = os.pipe()
            fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC | os.O_NONBLOCK)
            attempts = [
                ("F_SETSIG", lambda: fcntl.fcntl(r, 10, 9)),
                ("F_SETOWN", lambda: fcntl.fcntl(r, fcntl.F_SETOWN, pid)),
                ("F_SETOWN_EX", lambda: fcntl.fcntl(r, 15, struct.pack('ii', 1, pid))),
                ("FIOSETOWN", lambda: fcntl.ioctl(r, 0x8901, struct.pack('i', pid))),
                ("setpriority", lambda: os.setpriority(os.PRIO_PROCESS, pid, 19)),
                ("sched_setaffinity", lambda: os.sched_setaffinity(pid, {0})),
                ("sched_setscheduler", lambda: os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))),
                ("sched_setparam", lambda: os.sched_setparam(pid, os.sched_param(0))),
            ]
            for name, attempt in attempts:
                try:
                    attempt()
                    done.append(name)
                except OSError:
                    pass
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.syscall(251, 1, pid, 7) == 0:  # ioprio_set(IOPRIO_WHO_PROCESS, pid, ...)
                done.append("ioprio_set")
            os.write(w, b'x')  # fires SIGIO at the owner, if one was set
            return done"""), "{sibling_pid}"),
    ("own_scheduling", None, {"ok"}, "=[5, 1]", _p("""
        import os
        def f(x):
            os.setpriority(os.PRIO_PROCESS, 0, 5)
            os.sched_setaffinity(0, os.sched_getaffinity(0))
            return [os.getpriority(os.PRIO_PROCESS, 0), x]"""), "1"),
    # SysV IPC and POSIX message queues outlive the task and would link it to its determinism re-run
    ("sysv_ipc_and_mqueue", ("seccomp",), {"ok"}, "=[-1, -1, -1, -1]", _p("""
        import ctypes
        def f(x):
            libc = ctypes.CDLL(None)
            libc.mq_open.restype = ctypes.c_int
            return [libc.shmget(0, 4096, 0o1600), libc.semget(0, 1, 0o1600), libc.msgget(0, 0o1600),
                    libc.mq_open(b'/azr-exec-test', 0o102, 0o600, None)]"""), "0"),
    # a timer can end the task with a real-time signal, which has no name in `signal.Signals`
    ("realtime_signal", None, {"crash"}, "killed by signal 40", _p("""
        import ctypes, struct, time
        def f(x):
            libc = ctypes.CDLL(None)
            timer = ctypes.c_void_p()
            libc.timer_create(1, struct.pack('<qii', 0, 40, 0) + bytes(48), ctypes.byref(timer))
            libc.timer_settime(timer, 0, struct.pack('<qqqq', 0, 0, 0, 10 ** 6), None)
            time.sleep(1)"""), "0"),
    # os.sync() hides its result: the raw calls return -1, EPERM (sync, syncfs)
    ("sync_stalls_host_io", ("seccomp",), {"ok"}, "=[-1, 1, -1, 1]", _p("""
        import ctypes
        def f(x):
            libc = ctypes.CDLL(None, use_errno=True)
            return [libc.syscall(162), ctypes.get_errno(), libc.syscall(306, 0), ctypes.get_errno()]"""), "0"),
    # only the executor reports `internal` (a setup failure it saw): a frame claiming it is a crash
    ("forge_internal", None, {"crash"}, "malformed result frame", _p("""
        import json, os, struct
        def f(x):
            frame = json.dumps({'status': 'internal', 'value': None, 'error': 'Internal: forged'}).encode()
            for fd in range(3, 64):
                try:
                    os.write(fd, struct.pack('>I', len(frame)) + frame)
                except OSError:
                    pass
            return 1"""), "0"),
    ("code_as_input", None, {"error"}, "InvalidInput", "def f(x):\n    return x", "__import__('os').system('touch /azr-exec-pwned')"),
]


@pytest.mark.parametrize("case", _EXEC_CASES, ids=[c[0] for c in _EXEC_CASES])
def test_exec_adversarial(ex, world, case):
    name, needs, statuses, expect, program, inputs = case
    if needs and not set(needs) & set(ex.layers):
        pytest.skip(f"needs one of the layers {needs}; unavailable here: "
                    + "; ".join(f"{n}: {ex.skipped.get(n, 'not requested')}" for n in needs))
    zygote_pids = [z.proc.pid for z in _exec_zygotes(ex)]
    r = ex.run(program, inputs.format(**world))
    assert r.status in statuses, r
    if expect and expect.startswith("="):
        assert r.value == expect[1:], r
    elif expect and expect.startswith("!"):
        assert r.status != "ok" or r.value != expect[1:], r
    elif expect:
        assert any(e in (r.error or "") for e in expect.split("|")), r
    if r.status == "ok":
        parse_value(r.value)
    else:
        assert r.value is None
    if name == "import_trick":
        assert r.value.strip("'").startswith("/task/" if "mountns" in ex.layers else ex.slots[0].canonical.base_dir), r
    if name == "poison_builtins":  # the next task gets a fresh fork with the real builtins
        assert ex.run("def f(x):\n    return sorted(x)", "[3, 1]") == Result("ok", "[1, 3]", None)
    _exec_assert_contained(ex, world, zygote_pids)


def test_exec_adversarial_count():
    assert len(_EXEC_CASES) >= 40


def test_exec_task_cannot_reach_the_next_tasks_child(ex, world):
    """The next task's child may be forked (dir included) while a task runs: the task must not be able to
    plant files there, and the next task must start in an empty directory."""
    plant = _p("""
        import os
        def f(x):
            here = os.getcwd()
            parent = os.path.dirname(here)
            for n in range(1, 4):
                nxt = os.path.join(parent, str(int(os.path.basename(here)) + n))
                for attempt in (lambda: open(os.path.join(nxt, 'planted.txt'), 'w').write('x'),
                                lambda: os.chmod(nxt, 0), lambda: os.rename(nxt, nxt + '-moved'),
                                lambda: os.rmdir(nxt), lambda: os.mkdir(nxt), lambda: os.symlink('/', nxt),
                                lambda: open(os.path.join(parent, 'planted'), 'w')):
                    try:
                        attempt()
                        return 'changed ' + nxt
                    except OSError:
                        pass
            return 'refused'""")
    zygote_pids = [z.proc.pid for z in _exec_zygotes(ex)]
    results = [ex.run(plant, "0") for _ in range(3)]
    after = ex.run("import os\ndef f(x):\n    open('t', 'w').write('x')\n    return [sorted(os.listdir('.')), oct(os.stat('.').st_mode)]", "0")
    assert all(r == Result("ok", "'refused'", None) for r in results), results
    assert after == Result("ok", "[['t'], '0o40700']", None)
    _exec_assert_contained(ex, world, zygote_pids)


@pytest.fixture(scope="module")
def ex_ns():
    """Namespaces and the uid drop alone (no Landlock, no seccomp): what they stop by themselves."""
    with Executor(workers=1, timeout=2.0, memory_mb=512, layers=("netns", "pidns", "mountns", "uid")) as executor:
        yield executor


@pytest.fixture(scope="module")
def ex_flat():
    """Landlock and seccomp on the host's file tree (no private root, tasks as uid 0 without capabilities)."""
    with Executor(workers=1, timeout=2.0, memory_mb=512, layers=("netns", "pidns", "nocaps", "landlock", "seccomp"),
                  unsafe=True) as executor:
        yield executor


def _exec_needs(executor, *layers):
    missing = [n for n in layers if n not in executor.layers]
    if missing:
        pytest.skip("needs the layers " + "; ".join(f"{n} ({executor.skipped.get(n, 'not requested')})" for n in missing))


_EXEC_METADATA = _p("""
    import ctypes, fcntl, os, struct
    def f(paths):
        done = []
        for p in paths:
            attempts = [
                ("chmod", lambda: os.chmod(p, 0o6777)),
                ("fchmod", lambda: os.fchmod(os.open(p, os.O_RDONLY), 0o6777)),
                ("chown", lambda: os.chown(p, 65534, 65534)),
                ("utime", lambda: os.utime(p, (0, 0))),
                ("setxattr", lambda: os.setxattr(p, 'user.azr', b'planted')),
                ("removexattr", lambda: os.removexattr(p, 'user.canary')),
                ("setflags", lambda: fcntl.ioctl(os.open(p, os.O_RDONLY), 0x40086602, struct.pack('l', 0x40))),
            ]
            for name, attempt in attempts:
                try:
                    attempt()
                    done.append(name + ' ' + p)
                except OSError:
                    pass
        libc = ctypes.CDLL(None)
        fd = libc.inotify_init()
        if fd >= 0:
            done.append('inotify_init')
            if libc.inotify_add_watch(fd, paths[0].encode(), 0xfff) >= 0:
                done.append('inotify_add_watch')
        return done""")


def _exec_metadata(path: Path):
    """What a metadata attack could change: mode, owner, mtime, inode flags, xattrs."""
    import fcntl
    st = os.stat(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        flags = fcntl.ioctl(fd, 0x80086601, bytes(8))  # FS_IOC_GETFLAGS
    except OSError:
        flags = None
    finally:
        os.close(fd)
    return st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, flags, {k: os.getxattr(path, k) for k in os.listxattr(path)}


@pytest.mark.parametrize("which", ["ex", "ex_flat", "ex_ns"])
def test_exec_metadata_writes_refused(request, world, which):
    """chmod (setuid bits, or the x bits of an interpreter: here a canary copy), chown, utime, xattrs, inode
    flags on root-owned files outside the task dir all fail: under seccomp alone (ex_flat, where the task is
    uid 0 and owns the files), the uid drop with a private root (ex_ns), and all layers (ex). Seccomp also
    refuses them on the task's own dir, and inotify."""
    executor = request.getfixturevalue(which)
    if which == "ex_flat":
        _exec_needs(executor, "seccomp")
    if which == "ex_ns":
        _exec_needs(executor, "uid")
    d = Path(tempfile.mkdtemp(prefix="azr-exec-meta-"))
    try:
        d.chmod(0o755)
        python_copy = d / "python3"
        python_copy.write_bytes(b"#!/bin/sh\n")
        python_copy.chmod(0o755)
        note = d / "note.txt"
        note.write_text("x")
        note.chmod(0o644)
        for path in (d, python_copy, note):
            try:
                os.setxattr(path, "user.canary", b"1")
            except OSError:
                pass  # no user xattrs on this file system: the other checks still hold
        before = {p: _exec_metadata(p) for p in (d, python_copy, note)}
        zygote_pids = [z.proc.pid for z in _exec_zygotes(executor)]
        r = executor.run(_EXEC_METADATA, repr([str(note), str(python_copy), str(d), "."]))
        assert r.status == "ok", r
        done = parse_value(r.value)
        if "seccomp" in executor.layers:
            assert done == [], done  # not even on its own dir
        else:  # its own dir, and inotify on what it can see, are its business
            assert all(x.endswith(" .") or x.startswith("inotify") for x in done), done
        assert {p: _exec_metadata(p) for p in (d, python_copy, note)} == before
        _exec_assert_contained(executor, world, zygote_pids)
    finally:
        shutil.rmtree(d)


def _exec_scan_memory(pid: int, needle: bytes) -> list[str]:
    """Mappings of process `pid` whose readable memory holds `needle` (read from outside, via /proc)."""
    hits = []
    with open(f"/proc/{pid}/maps") as fh:
        maps = fh.read().splitlines()
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]", "[vvar_vclock]")):
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            try:
                if needle in os.pread(fd, hi - lo, lo):
                    hits.append(line)
            except OSError:
                pass
    finally:
        os.close(fd)
    return hits


def test_exec_no_earlier_task_data_in_zygote_or_later_tasks(ex):
    """A task's program, inputs and outputs never reach the zygote's memory, so no later fork inherits them:
    scanned from outside, in the zygote and in every child it has while a later task runs."""
    import threading
    marker = f"azrmark{random.getrandbits(64):016x}"
    program = f"def f(x):\n    return x + '-{marker[::-1]}'[::-1]"  # the output holds the marker reversed back
    r = ex.run(program, repr(f"{marker}-in"))
    assert r.status == "ok" and marker in r.value, r
    box = []
    later = threading.Thread(target=lambda: box.append(ex.run("import time\ndef f(x):\n    time.sleep(1)\n    return x", "1")))
    later.start()
    z = ex.slots[0].canonical
    zygote = _exec_zygote_pid(z)
    children = Path(f"/proc/{zygote}/task/{zygote}/children")
    scanned = {zygote: _exec_scan_memory(zygote, marker.encode())}

    def scan_children():  # until one is caught alive: a spare may be retired between listing and scanning
        for kid in set(map(int, children.read_text().split())) - set(scanned):
            try:
                scanned[kid] = _exec_scan_memory(kid, marker.encode())
            except OSError:
                pass  # ended meanwhile
        return len(scanned) >= 2
    _exec_wait(scan_children, 300)
    later.join()
    assert box == [Result("ok", "1", None)]
    assert len(scanned) >= 2, "no task child was scanned"
    assert all(hits == [] for hits in scanned.values()), scanned


def _exec_threads_of_uid(uid: int) -> int:
    n = 0
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                status = Path(f"/proc/{p}/status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                n += int(fields["Threads"])
    return n


@pytest.mark.parametrize("which", ["ex", "ex_ns"])
def test_exec_threads_capped_per_uid(request, which):
    """A task may not start thousands of threads: RLIMIT_NPROC counts its uid's threads machine-wide (the
    uid is its zygote's alone). Counted from outside while the task holds its threads."""
    import threading
    executor = request.getfixturevalue(which)
    _exec_needs(executor, "uid")
    program = _p("""
        import threading, time
        def f(n):
            started = 0
            try:
                for _ in range(n):
                    threading.Thread(target=time.sleep, args=(1.2,), daemon=True).start()
                    started += 1
            except RuntimeError:
                pass
            time.sleep(0.6)
            return started""")
    box = []
    t = threading.Thread(target=lambda: box.append(executor.run(program, "2000")))
    t.start()
    uid, most = executor.slots[0].canonical.hello["uid"], 0
    while t.is_alive():
        most = max(most, _exec_threads_of_uid(uid))
        select.select([], [], [], 0.02)
    assert box[0].status == "ok" and 1 <= int(box[0].value) < 16, box
    assert 1 <= most <= 16, most
    assert executor.run("def f(x):\n    return x", "3") == Result("ok", "3", None)


_EXEC_UIDS = """
import json, sys
sys.path.insert(0, sys.argv[1])
from executor import Executor
with Executor(workers=2, timeout=2.0) as ex:
    ex.run_batch([("def f(x):\\n    return x", "1")] * 4, check_determinism=True)  # the determinism zygotes too
    rs = ex.run_batch([("import os\\ndef f(x):\\n    return os.getuid()", "0")] * 4)
    print(json.dumps({"uids": [z.hello["uid"] for s in ex.slots for z in (s.canonical, s.probe)],
                      "seen": [r.value for r in rs]}))
"""


def test_exec_uids_never_shared_by_live_zygotes(ex, ex_ns):
    """Every live zygote on the machine has a uid of its own: the executors of this process and one in
    another process (as another agent or CI job would run), determinism zygotes included; a closed
    executor's uid is free again (its lock is released)."""
    import fcntl
    from executor import _UID_LOCK_DIRS
    _exec_needs(ex, "uid")
    ex.run_batch([("def f(x):\n    return x", "1")] * 4, check_determinism=True)  # start the determinism zygotes
    ours = [z.hello["uid"] for e in (ex, ex_ns) for z in _exec_zygotes(e)]
    seen = {int(r.value) for r in ex.run_batch([("import os\ndef f(x):\n    return os.getuid()", "0")] * 8)}
    assert seen <= set(ours) and len(ours) == 5, (seen, ours)
    out = subprocess.run([sys.executable, "-c", _EXEC_UIDS, str(REPO)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    theirs = json.loads(out.stdout)
    assert {int(v) for v in theirs["seen"]} <= set(theirs["uids"])
    assert len(set(ours + theirs["uids"])) == len(ours) + 4, (ours, theirs)
    with Executor(workers=1, timeout=2.0) as again:
        uid = again.slots[0].canonical.hello["uid"]
        assert uid not in ours
    lock = next(Path(d) / str(uid) for d in _UID_LOCK_DIRS if (Path(d) / str(uid)).exists())
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if still held
    finally:
        os.close(fd)


_EXEC_DIES = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from executor import Executor
ex = Executor(workers=1, timeout=2.0)
z = ex.slots[0].canonical
ex.run("def f(x):\\n    open('a', 'w').write('x' * 1000)\\n    return x", "1")
print(json.dumps({"base": z.base_dir, "pid": z.proc.pid, "layers": ex.layers}), flush=True)
os._exit(0)  # no close(): a trainer killed
"""


def test_exec_trainer_that_dies_leaves_nothing():
    """A trainer that dies without close(): its zygotes see EOF and exit (taking their tasks along), and with
    a private root nothing of theirs stays on /dev/shm."""
    out = subprocess.run([sys.executable, "-c", _EXEC_DIES, str(REPO)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    if "mountns" not in report["layers"]:
        pytest.skip("without a private root the dead trainer's empty base dir stays (nobody is left to remove it)")
    stat = Path(f"/proc/{report['pid']}/stat")
    gone = lambda: not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"  # noqa: E731
    _exec_wait(gone, 300)
    assert gone(), "the zygote outlived its trainer"
    assert not Path(report["base"]).exists()


def test_exec_root_without_uid_layer_needs_unsafe():
    """As root, tasks that cannot drop to an unprivileged uid would still own every root-owned file: the
    executor refuses unless told unsafe=True, with a one-line reason."""
    if os.geteuid() != 0:
        pytest.skip("only a root trainer needs the uid layer")
    with pytest.raises(ValueError, match="unsafe=True") as info:
        Executor(workers=1, layers=("landlock", "seccomp"))
    assert "\n" not in str(info.value)
    stdlib = Path(os.__file__).resolve()
    if _exec_world_readable(stdlib):
        pytest.skip(f"{stdlib} is world-readable: the uid layer works here even without a private root")
    with pytest.raises(RuntimeError, match="unsafe=True") as info:  # no private root: the uid cannot read the stdlib
        Executor(workers=1, layers=("uid", "landlock", "seccomp"))
    assert "\n" not in str(info.value)
    with Executor(workers=1, layers=("uid", "landlock", "seccomp"), unsafe=True) as executor:
        assert "uid" not in executor.layers and executor.run("def f(x):\n    return x", "1") == Result("ok", "1", None)


@pytest.mark.parametrize("which", ["ex", "ex_ns"])
def test_exec_host_is_hidden(request, world, which):
    """A task sees no host process and cannot signal or pidfd-open the trainer (PID namespace), and sees no
    host file but the read-only interpreter and system dirs (private root)."""
    executor = request.getfixturevalue(which)
    _exec_needs(executor, "pidns", "mountns")
    program = _p("""
        import os, socket
        def f(pid, path):
            out = {}
            for name, attempt in [("kill", lambda: os.kill(pid, 0)), ("pidfd_open", lambda: os.pidfd_open(pid)),
                                  ("stat_proc", lambda: os.stat(f'/proc/{pid}')), ("stat_path", lambda: os.stat(path)),
                                  ("stat_etc", lambda: os.stat('/etc/passwd')), ("list_proc", lambda: os.listdir('/proc')),
                                  ("list_root", lambda: sorted(os.listdir('/')))]:
                try:
                    out[name] = attempt()
                    if not isinstance(out[name], (list, int)):
                        out[name] = 'done'
                except OSError as e:
                    out[name] = type(e).__name__
            out['host'] = socket.gethostname()
            return out""")
    r = executor.run(program, f"{world['trainer_pid']}, {world['canary']!r}")
    assert r.status == "ok", r
    seen = parse_value(r.value)
    assert seen["kill"] in ("PermissionError", "ProcessLookupError") and seen["pidfd_open"] in ("PermissionError", "ProcessLookupError")
    assert seen["stat_proc"] == seen["stat_path"] == seen["stat_etc"] == "FileNotFoundError", seen
    if "landlock" not in executor.layers:  # readable only without Landlock: a handful of pids, the root's few dirs
        assert all(int(p) < 100 for p in seen["list_proc"] if p.isdigit()), seen
        assert set(seen["list_root"]) <= {"usr", "lib", "lib64", "bin", "root", "proc", "task", "opt", "home"}, seen
    assert seen["host"] != socket.gethostname()
    z = executor.slots[0].canonical
    assert os.readlink(f"/proc/{_exec_zygote_pid(z)}/ns/pid") != os.readlink("/proc/self/ns/pid")
    assert world["sibling"].poll() is None


@pytest.mark.parametrize("value", ["1e999", "-1e999", "[1, (2, 1e999j)]", "{'a': 1e999 - 1e999}", "'x' * 500",
                                   "set([1e999])", "[[0] * 300] * 2"])
def test_exec_forged_frames_rechecked(ex, world, value):
    """A program that writes its own `ok` frame (it can reach its result pipe) cannot plant a value the
    executor's own checks refuse: inf, nan, or a repr over the output cap from a short text."""
    program = _p(f"""
        import json, os, struct
        def f(x):
            body = json.dumps({{'status': 'ok', 'value': {value!r}, 'error': None}}).encode()
            for fd in range(3, 64):
                try:
                    os.write(fd, struct.pack('>I', len(body)) + body)
                except OSError:
                    pass
            os._exit(0)""")
    zygote_pids = [z.proc.pid for z in _exec_zygotes(ex)]
    r = ex.run(program, "0")
    assert r.status == "crash" and "malformed" in r.error, r
    _exec_assert_contained(ex, world, zygote_pids)


def test_exec_zygote_has_private_ipc_namespace(ex):
    """With netns, the zygote also gets its own IPC namespace: no task's SysV IPC reaches the host's."""
    if "netns" not in ex.layers:
        pytest.skip(f"netns layer unavailable: {ex.skipped.get('netns')}")
    flags = ["--ipc", "--net"] + ([] if os.geteuid() == 0 else ["--user"])
    if not shutil.which("unshare") or subprocess.run(["unshare", *flags, "true"], capture_output=True).returncode:
        pytest.skip("this kernel or machine refuses a new IPC namespace")
    own = os.readlink("/proc/self/ns/ipc")
    assert all(os.readlink(f"/proc/{z.proc.pid}/ns/ipc") != own for z in _exec_zygotes(ex))


# Dirs past the recursion limit and PATH_MAX, wide dirs, links out (the cleanup must not follow them), and
# dirs locked with chmod 000 where a layer does not refuse chmod. Returns how many dirs it locked.
_EXEC_TREE = _p("""
    import os
    def f(d):
        os.mkdir('wide')
        for i in range(500):
            open(f'wide/{i}', 'w').close()
        os.symlink(d, 'out')
        os.symlink(d, 'wide/out')
        here = os.open('.', os.O_RDONLY)
        for _ in range(3000):
            os.mkdir('d')
            os.chdir('d')
        open('deep.txt', 'w').write('x')
        os.fchdir(here)
        locked = 0
        for p in ('wide', 'd'):
            try:
                os.chmod(p, 0)
                locked += 1
            except OSError:
                pass
        return locked""")


def test_exec_cleanup_survives_any_tree(ex, world):
    """Whatever tree a task leaves, its worker keeps serving (same zygote), the next task starts in an empty
    dir and the tree is gone; nothing outside the task dir is touched."""
    zygote_pids = [z.proc.pid for z in _exec_zygotes(ex)]
    mode = os.stat(world["canary"]).st_mode
    locked = "0" if "seccomp" in ex.layers else "2"
    for _ in range(2):
        assert ex.run(_EXEC_TREE, repr(world["canary"])) == Result("ok", locked, None)
        assert ex.run("import os\ndef f(x):\n    return sorted(os.listdir('.'))", "0") == Result("ok", "[]", None)
    assert os.stat(world["canary"]).st_mode == mode
    _exec_assert_contained(ex, world, zygote_pids)


def test_exec_cleanup_without_layers_and_close_leaves_nothing(world):
    """With no layer (no private tmpfs per task, chmod allowed) the zygote removes a task's tree itself; and
    close() never raises and leaves nothing on tmpfs, also after a zygote died with a tree in place."""
    with Executor(workers=1, timeout=5.0, layers=(), unsafe=True) as executor:
        zygote_pids = [z.proc.pid for z in _exec_zygotes(executor)]
        assert executor.run(_EXEC_TREE, repr(world["canary"])) == Result("ok", "2", None)
        assert executor.run("import os\ndef f(x):\n    return sorted(os.listdir('.'))", "0") == Result("ok", "[]", None)
        _exec_assert_contained(executor, world, zygote_pids)
        base = Path(executor.slots[0].canonical.base_dir)
        import threading
        box = []
        hold = _EXEC_TREE.replace("    return locked", "    import time\n    time.sleep(4)\n    return locked")
        t = threading.Thread(target=lambda: box.append(executor.run(hold, repr(world["canary"]))))
        t.start()
        # the tree is built, the task sleeps on it
        _exec_wait(lambda: any(base.glob("*/d/d/d")) and len(list(base.glob("*/wide/*"))) > 400)
        select.select([], [], [], 0.3)
        executor.slots[0].canonical.proc.kill()
        t.join()
        assert box[0].status == "internal", box
    assert not base.exists(), "the executor's tmpfs dir outlived close()"
    executor.close()  # again: still never raises
    assert sorted(os.listdir(world["canary"])) == ["keep.txt"]


def test_exec_later_zygotes_keep_the_first_zygotes_layers(caplog):
    """A restarted or determinism zygote that cannot enable a layer the first zygote had refuses to start
    (its tasks are `internal`, with a warning) rather than run tasks with fewer layers; restarts are logged."""
    with Executor(workers=1, timeout=2.0) as executor:
        if not executor.layers:
            pytest.skip("no layer available: nothing to lose")
        dropped = executor.layers[-1]
        probe = executor.slots[0].probe  # make its layer unavailable to it, as a full /dev/shm would
        probe.cfg = dict(probe.cfg, layers=[name for name in probe.cfg["layers"] if name != dropped])
        with caplog.at_level(logging.WARNING, logger="azr.executor"):
            r = executor.run_batch([("def f(x):\n    return x", "1")], check_determinism=True)[0]
            assert r.status == "internal" and dropped in r.error, r
            assert f"refused to start: required layers unavailable ({dropped}" in caplog.text
            canonical = executor.slots[0].canonical
            canonical.proc.kill()
            canonical.proc.wait()
            assert executor.run("def f(x):\n    return x", "2") == Result("ok", "2", None)
            assert "zygote 0 restarting" in caplog.text
            assert canonical.hello["layers"] == list(executor.layers)
            canonical.cfg = dict(canonical.cfg, layers=[])  # `run` too answers `internal`, never raises
            canonical.proc.kill()
            canonical.proc.wait()
            r = executor.run("def f(x):\n    return x", "3")
            assert r.status == "internal" and "refused" in r.error, r


def test_exec_kwargs_and_batch_order(ex):
    prog = "def f(a, b=0, *, c=1):\n    return [a, b, c]"
    jobs = [(prog, f"{i}, c={i * 2}") for i in range(30)] + [(prog, "1, 2, 3, 4")]
    rs = ex.run_batch(jobs)
    assert [r.value for r in rs[:30]] == [repr([i, 0, i * 2]) for i in range(30)]
    assert rs[30].status == "error" and rs[30].error.startswith("TypeError")


def test_exec_determinism_check(ex):
    deterministic = [
        "def f(xs):\n    return sorted(set(xs))",
        "def f(xs):\n    return set(xs)",                      # same set, printed in another order
        "def f(xs):\n    return {x: len(x) for x in xs}",
        "from collections import Counter\ndef f(xs):\n    return sorted(Counter(''.join(xs)).items())",
    ]
    nondeterministic = [
        "def f(xs):\n    return list(set(xs))",                # string hash order
        "def f(xs):\n    return id(object())",                 # heap layout
        "def f(xs):\n    return hash(xs[0])",
        "import random\ndef f(xs):\n    return random.random()",
        "import os\ndef f(xs):\n    return os.environ['PYTHONHASHSEED']",
    ]
    xs = "['apple', 'banana', 'cherry', 'date', 'elder', 'fig', 'grape']"
    rs = ex.run_batch([(p, xs) for p in deterministic + nondeterministic], check_determinism=True)
    plain = ex.run_batch([(p, xs) for p in deterministic + nondeterministic])
    assert all(r.status == "ok" for r in rs[:len(deterministic)]), rs
    assert [r.value for r in rs[:len(deterministic)]] == [r.value for r in plain[:len(deterministic)]]
    for r, p in zip(rs[len(deterministic):], plain[len(deterministic):]):
        assert p.status == "ok" and r.status == "error" and r.error.startswith("Nondeterministic"), (r, p)
    failing = ex.run_batch([("def f(x):\n    return 1 / x", "0")], check_determinism=True)[0]
    assert failing.status == "error" and failing.error.startswith("ZeroDivisionError")


def test_exec_determinism_sees_clocks_time_zone_and_call_order(ex):
    """The second run has its monotonic and boot clocks 11.7 days ahead, a time zone 13.5 h east, and runs each
    input alone: outputs derived from those differ even when rounded to a day or an hour, and an output that
    depends on the inputs before it is refused wherever it stands (the middle of an odd-length list too); the
    first input, whose history is empty in both runs, is deterministic."""
    clocks = ["import time\ndef f(x):\n    return int(time.monotonic() // 86400)",
              "import time\ndef f(x):\n    return int(time.clock_gettime(time.CLOCK_BOOTTIME) // 3600)"]
    zone = ["import time\ndef f(x):\n    return time.localtime().tm_hour",
            "import datetime\ndef f(x):\n    return datetime.datetime.now().hour"]
    calls = "import math\ndef f(x):\n    math.azr_calls = getattr(math, 'azr_calls', 0) + 1\n    return math.azr_calls"
    rs = ex.run_batch([(p, "0") for p in clocks + zone] + [(calls, ["1", "2", "3"])], check_determinism=True)
    assert all(r.status == "error" and r.error.startswith("Nondeterministic") for r in rs[len(clocks):-1]), rs
    assert rs[-1][0] == Result("ok", "1", None), rs[-1]
    assert all(r.status == "error" and r.error.startswith("Nondeterministic") for r in rs[-1][1:]), rs[-1]
    if ex.slots[0].probe.hello["clock"] != "offset":
        pytest.skip(f"no time namespace here: {ex.slots[0].probe.hello['clock']}")
    assert all(r.status == "error" and r.error.startswith("Nondeterministic") for r in rs[:len(clocks)]), rs


def test_exec_batched_inputs_match_separate_runs(ex):
    """(program, [inputs]) runs every input in one child, each as a fresh run of the program: the same
    results as one job per input (module state, a seeded `random`, errors), in order, past the per-child
    batch size."""
    programs = ["import random\nrandom.seed(7)\nseen = []\ndef f(x):\n    seen.append(x)\n    return [10 // x, len(seen), random.random()]",
                "def f(a, b=1):\n    return {a: b}"]
    inputs = [["1", "0", "2", "x", "5"] + [str(i) for i in range(1, 16)], ["1", "2, b=3", "[1]", "'k'", ""]]
    batched = ex.run_batch(list(zip(programs, inputs)))
    separate = ex.run_batch([(p, i) for p, xs in zip(programs, inputs) for i in xs])
    assert [r for rs in batched for r in rs] == separate
    assert batched[0][1].error.startswith("ZeroDivisionError") and batched[0][3].error.startswith("InvalidInput")
    assert batched[1][2].error.startswith("TypeError") and batched[1][0] == Result("ok", "{1: 1}", None)
    assert ex.run(programs[1], []) == [] and ex.run(programs[1], ["7"]) == [Result("ok", "{7: 1}", None)]
    checked = ex.run_batch([("def f(x):\n    return x * 2", ["1", "2"]), ("def f(x):\n    return id(x)", ["1", "2"])],
                           check_determinism=True)
    assert checked[0] == [Result("ok", "2", None), Result("ok", "4", None)]
    assert all(r.error.startswith("Nondeterministic") for r in checked[1])
    for bad in [("def f(x):\n    return x", ["1", 2]), ("def f(x):\n    return x", 1), ("def f(x):\n    return x",)]:
        with pytest.raises(TypeError, match="a job is"):
            ex.run_batch([bad])


def test_exec_batched_input_failure_never_changes_the_others(ex, world):
    """An input that times out, crashes or exits its child gets that status; the inputs after it run in a
    fresh child and get their own right results."""
    program = _p("""
        import os, time
        def f(x):
            if x == 'sleep':
                time.sleep(100)
            if x == 'exit':
                os._exit(3)
            if x == 'segv':
                import ctypes
                ctypes.string_at(0)
            return x * 2""")
    zygote_pids = [z.proc.pid for z in _exec_zygotes(ex)]
    rs = ex.run(program, ["'a'", "'exit'", "'b'", "'segv'", "'c'", "'sleep'", "'d'"])
    assert [r.status for r in rs] == ["ok", "crash", "ok", "crash", "ok", "timeout", "ok"], rs
    assert [r.value for r in rs[::2]] == ["'aa'", "'bb'", "'cc'", "'dd'"]
    assert "status 3" in rs[1].error and "SIGSEGV" in rs[3].error
    _exec_assert_contained(ex, world, zygote_pids)


def test_exec_stdio_flags_never_reach_a_later_task(ex):
    """Every task has a /dev/null of its own: file status flags set on its stdio (they live in the open file,
    shared by every dup of it) are gone for the next tasks, on both workers."""
    flags = "os.O_NONBLOCK | os.O_APPEND"
    set_flags = _p(f"""
        import fcntl, os
        def f(x):
            for fd in (0, 1, 2):
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | {flags})
            return fcntl.fcntl(1, fcntl.F_GETFL) & ({flags})""")
    get_flags = f"import fcntl, os\ndef f(x):\n    return [fcntl.fcntl(fd, fcntl.F_GETFL) & ({flags}) for fd in (0, 1, 2)]"
    assert [ex.run(set_flags, "0") for _ in range(2)] == [Result("ok", str(os.O_NONBLOCK | os.O_APPEND), None)] * 2
    assert [ex.run(get_flags, "0") for _ in range(4)] == [Result("ok", "[0, 0, 0]", None)] * 4


def test_exec_interrupted_job_never_confuses_the_next(ex_ns):
    """A job interrupted in the trainer (Ctrl-C, a signal handler that raises) restarts its zygote: the verdict it
    would still send is never taken for the next job's, which gets its own right result."""
    class Interrupt(BaseException):
        pass

    def interrupt(*_):
        raise Interrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(Interrupt):
            ex_ns.run("import time\ndef f(x):\n    time.sleep(1)\n    return x", "1")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert ex_ns.run("import time\ndef f(x):\n    time.sleep(1.5)\n    return x", "2") == Result("ok", "2", None)


def test_exec_batched_inputs_timed_one_by_one(ex_ns):
    """Each input of a job has the whole timeout to itself, wall clock and CPU: two inputs that each take
    over half of it both succeed, and the CPU limit grows with the number of inputs."""
    timeout = ex_ns.slots[0].canonical.cfg["timeout"]
    program = _p(f"""
        import resource, time
        def f(x):
            time.sleep({0.6 * timeout} * x)
            return resource.getrlimit(resource.RLIMIT_CPU)[0]""")
    rs = ex_ns.run(program, ["1", "1"])
    cpu = math.ceil(timeout) + 1
    assert rs == [Result("ok", str(2 * cpu), None)] * 2, rs
    assert ex_ns.run(program, "0") == Result("ok", str(cpu), None)


def test_exec_killed_zygote_is_internal_then_recovers(world):
    with Executor(workers=1, timeout=10.0) as executor:
        import threading
        box = []
        t = threading.Thread(target=lambda: box.append(executor.run("import time\ndef f(x):\n    time.sleep(8)", "0")))
        t.start()
        launched = executor.slots[0].canonical.proc.pid
        zygote = _exec_zygote_pid(executor.slots[0].canonical)
        children = Path(f"/proc/{zygote}/task/{zygote}/children")
        _exec_wait(lambda: children.exists() and children.read_text().split())
        task = int(children.read_text().split()[0])
        os.kill(zygote, signal.SIGKILL)
        t.join()
        assert box[0].status == "internal", box
        # the task dies of its parent-death signal (and with its PID namespace)
        dead = lambda: not Path(f"/proc/{task}").exists() or Path(f"/proc/{task}/stat").read_text().split()[2] == "Z"  # noqa: E731
        _exec_wait(dead, 200)
        assert dead()
        assert executor.run("def f(x):\n    return x * 2", "21") == Result("ok", "42", None)
        assert executor.slots[0].canonical.proc.pid != launched


def test_exec_no_layers_still_correct(world, caplog):
    """Where no layer is available the executor must still give the right statuses and clean up."""
    with caplog.at_level(logging.INFO, logger="azr.executor"):
        executor = Executor(workers=1, timeout=2.0, memory_mb=512, layers=(), unsafe=True)
    with executor:
        assert executor.layers == () and "layers active: none" in caplog.text
        cases = [c for c in _EXEC_CASES if c[0] in {"infinite_loop", "bytearray_bomb", "fork_once", "setsid_double_fork",
                                                     "fork_storm_200", "os_exit", "write_read_cwd", "poison_builtins",
                                                     "long_return", "forged_frame", "environ_secret"}]
        for name, _, statuses, _, program, inputs in cases:
            zygote_pids = [z.proc.pid for z in _exec_zygotes(executor)]
            assert executor.run(program, inputs.format(**world)).status in statuses, name
            _exec_assert_contained(executor, world, zygote_pids)


def test_exec_layers_logged(ex, caplog):
    with caplog.at_level(logging.INFO, logger="azr.executor"):
        Executor(workers=1, timeout=1.0).close()
    assert "layers active: " + ", ".join(ex.layers) in caplog.text
    for name, why in ex.skipped.items():
        assert f"layer {name} skipped: {why}" in caplog.text


_EXEC_OTHER_INTERPRETER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from executor import Executor
with Executor(workers=1, timeout=2.0) as ex:
    rs = [ex.run("import os\\ndef f(x):\\n    return [os.getuid(), x]", "5"),
          ex.run("def f(d):\\n    open(d + '/pwned', 'w')", repr(sys.argv[2])),
          ex.run("import os\\ndef f(x):\\n    os.fork()", "0")]
    print(json.dumps({"layers": ex.layers, "skipped": ex.skipped, "results": rs}))
"""


def _exec_world_readable(path: Path) -> bool:
    return all(p.stat().st_mode & 0o005 == 0o005 for p in path.parents) and path.stat().st_mode & 0o004


def _exec_other_python() -> Path:
    """A Python >= 3.11 whose stdlib any uid can read, or skip."""
    python = Path(sys.executable).resolve()
    stdlib = Path(os.__file__).resolve()
    if not _exec_world_readable(stdlib) or not _exec_world_readable(python):
        candidates = [Path(p) for p in ("/usr/bin/python3", "/usr/local/bin/python3") if Path(p).exists()]
        python = next((p.resolve() for p in candidates if _exec_world_readable(p.resolve())), None)
        if python is None:
            pytest.skip(f"no Python with a world-readable stdlib here ({stdlib} is not)")
    if subprocess.run([str(python), "-c", "import sys; assert sys.version_info >= (3, 11)"]).returncode:
        pytest.skip(f"{python} is older than 3.11")
    return python


@pytest.mark.parametrize("as_user", ["root_uid_drop", "ordinary_user"])
def test_exec_other_users(world, as_user):
    """As root with a world-readable stdlib, children drop to a per-worker uid; as an ordinary user,
    the executor works with the layers that need no privilege."""
    python = _exec_other_python()
    if os.geteuid() != 0:
        pytest.skip("needs root to test a uid drop or to become an ordinary user")
    executor_py = next(p for p in Path(__file__).resolve().parents if (p / "executor.py").is_file()) / "executor.py"
    cmd = [str(python), "-c", _EXEC_OTHER_INTERPRETER, str(executor_py.parent), world["canary"]]
    if as_user == "ordinary_user":
        if not shutil.which("setpriv") or not _exec_world_readable(executor_py):
            pytest.skip("needs setpriv and a world-readable executor.py")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + cmd
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    (s0, v0, _), (s1, _, e1), (s2, _, _) = report["results"]
    uid = parse_value(v0)[0]
    assert s0 == "ok" and parse_value(v0)[1] == 5
    if as_user == "ordinary_user":
        assert uid == 65534 and "uid" not in report["layers"]
    else:
        assert "uid" in report["layers"], report["skipped"]
        assert uid >= 61000
    # the canary dir is root's 0700 (no layer needed), or not even there (private root)
    assert s1 == "error" and ("PermissionError" in e1 or "FileNotFoundError" in e1)
    assert s2 == "error" or "seccomp" not in report["layers"]
    assert sorted(os.listdir(world["canary"])) == ["keep.txt"]


_EXEC_LOCKED_DIR = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from executor import Executor
lock = "import os\\ndef f(x):\\n    os.mkdir('a')\\n    open('a/big', 'wb').write(bytes(1 << 20))\\n    os.chmod('a', 0)"
with Executor(workers=1, timeout=2.0, layers=()) as ex:  # no seccomp, which refuses chmod; no private tmpfs
    base = ex.slots[0].canonical.base_dir
    rs = [ex.run(lock, "0"), ex.run("def f(x):\\n    return x", "7")]
print(json.dumps({"results": rs, "left": os.path.exists(base)}))
"""


def test_exec_locked_dir_as_ordinary_user():
    """Without root's DAC override, a task dir with a chmod-000 subdir must still be removed, without
    losing the zygote, and nothing may be left in /dev/shm after close()."""
    python = _exec_other_python()
    executor_py = next(p for p in Path(__file__).resolve().parents if (p / "executor.py").is_file()) / "executor.py"
    cmd = [str(python), "-c", _EXEC_LOCKED_DIR, str(executor_py.parent)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv") or not _exec_world_readable(executor_py):
            pytest.skip("needs setpriv and a world-readable executor.py to run as an ordinary user")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + cmd
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["results"][0] == ["ok", "None", None], report
    assert report["results"][1] == ["ok", "7", None], report
    assert not report["left"], "the executor's /dev/shm dir outlived close()"


# ------------------------------------------------------------------------------------------ real programs

def _exec_data_jobs():
    jobs = []  # (file, index, program, inputs, stored output)
    for line_no, line in enumerate(shared_data("3b_coder_seed_io.jsonl").read_text().splitlines()):
        d = json.loads(line)
        jobs.append(("3b_coder_seed_io", line_no, d["snippet"], d["input"], d["output"]))
    for line_no, line in enumerate(shared_data("3b_coder_code_f_seed_io.jsonl").read_text().splitlines()):
        d = json.loads(line)
        jobs += [("3b_coder_code_f_seed_io", line_no, d["snippet"], i, o) for i, o in zip(d["inputs"], d["outputs"])]
    for line_no, line in enumerate(shared_data("cruxeval.jsonl").read_text().splitlines()):
        d = json.loads(line)
        jobs.append(("cruxeval", line_no, d["code"], d["input"], d["output"]))
    return jobs


def _exec_why_differs(program, inputs, stored, r, ex_max_output=400):
    """The legitimate reasons an entry's result differs from its stored output, or None."""
    try:
        parse_args(inputs)
    except ValueError:
        if r.status == "error" and r.error.startswith("InvalidInput"):
            return "input is not a safe value expression (SPEC rule 3)"
    try:
        parse_value(stored)
    except ValueError:
        return "stored output is not a value (upstream stored a truncated, empty or non-literal repr)"
    if r.status == "error" and r.error.startswith("ModuleNotFoundError"):
        module = r.error.split("'")[1].split(".")[0]
        if module not in sys.stdlib_module_names:
            return f"imports {module}, which is not in the standard library"
    if r.status == "output_limit" and len(stored) > ex_max_output:
        return f"repr longer than {ex_max_output} characters (upstream stored it cut short)"
    return None


def test_exec_reproduces_stored_outputs(ex):
    jobs = _exec_data_jobs()
    results = ex.run_batch([(p, i) for _, _, p, i, _ in jobs])
    matched, differ, unexplained = {}, {}, []
    for (name, line_no, program, inputs, stored), r in zip(jobs, results):
        if r.status == "ok":
            try:
                if values_equal(parse_value(r.value), parse_value(stored)):
                    matched[name] = matched.get(name, 0) + 1
                    continue
            except ValueError:
                pass
        why = _exec_why_differs(program, inputs, stored, r)
        if why is None:
            unexplained.append((name, line_no, inputs[:60], stored[:60], r))
        differ.setdefault((name, why), []).append(line_no)
    summary = "\n".join(f"{n}: {len(v)} differ: {why}: lines {sorted(set(v))[:20]}" for (n, why), v in sorted(differ.items(), key=str))
    print(f"matched {matched}\n{summary}")
    assert unexplained == [], "\n".join(map(str, unexplained))


# ==============================================================================================================
# model.py: decoder and sampler against transformers (issue 3)
# ==============================================================================================================

def _model_config(kind: str, tied: bool) -> "M.ModelConfig":
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2, head_dim=16,
                  num_layers=2, tie_word_embeddings=tied, max_position_embeddings=4096, eos_token_id=None)
    if kind == "qwen2":
        return M.ModelConfig(**common, rope_theta=1e6, qkv_bias=True, model_type="qwen2")
    # small original context so all three Llama-3 frequency bands (kept, interpolated, divided) occur
    return M.ModelConfig(**common, rope_theta=5e5, model_type="llama", rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=256))


def _model_hf_checkpoint(hf_config, path, tokenizer, seed: int = 0):
    """A transformers model with random weights (biases and norms too), saved by transformers with the tokenizer."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_config(hf_config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.15 * noise)
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return hf


def _model_hf_and_ours(kind: str, tied: bool, tmp_path, seed: int = 0):
    """A transformers model with random weights, and ours loaded from its files."""
    hf = _model_hf_checkpoint(_model_config(kind, tied).to_hf(), tmp_path / "hf", M.byte_tokenizer(), seed)
    ours, _ = M.load_model(str(tmp_path / "hf"))
    return hf, ours


def _model_logits(model, ids):
    return model.lm_head(model(ids))


def _model_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("kind,tied", [("qwen2", True), ("qwen2", False), ("llama", False), ("llama", True)])
def test_model_logits_match_transformers(kind, tied, tmp_path):
    hf, ours = _model_hf_and_ours(kind, tied, tmp_path)
    assert ours.config == _model_config(kind, tied)
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == tied
    ids = torch.randint(0, 300, (2, 600), generator=torch.Generator().manual_seed(1))  # past the 256 of llama3
    with torch.no_grad():
        assert _model_rel_err(_model_logits(ours, ids), hf(ids).logits) < 1e-4


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_model_greedy_matches_transformers_generate(kind, tmp_path):
    hf, ours = _model_hf_and_ours(kind, False, tmp_path)
    prompts = [[5, 17, 200, 3], [9] * 11, list(range(40, 63)), [250]]
    samples = M.generate(ours, prompts, max_new_tokens=24, temperature=0.0)
    for prompt, s in zip(prompts, samples):
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, min_new_tokens=24,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert s.tokens == ref and s.finish_reason == "length"


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8), (0.0, 1.0)])
def test_model_logprobs_match_full_forward(temperature, top_p):
    """Returned logprobs = log_softmax(logits / T) of a full-sequence forward at the sampled tokens, with the
    padded LM-head rows (>= len(tokenizer)) masked; top-p only restricts which tokens are drawn."""
    model, tok = M.load_model("tiny", seed=3)
    M.init_weights(model, seed=3, std=0.3)
    prompts = [tok.encode("def f(x):"), tok.encode("a")]
    samples = M.generate(model, prompts, n=2, max_new_tokens=12, temperature=temperature, top_p=top_p,
                         tokenizer=tok, seed=7)
    assert len(samples) == 4
    for k, s in enumerate(samples):
        prompt = prompts[k // 2]
        with torch.no_grad():
            logits = _model_logits(model, torch.tensor([prompt + s.tokens]))[0, len(prompt) - 1:-1].double()
        logits[:, len(tok):] = -float("inf")
        ref = (logits / (temperature or 1.0)).log_softmax(-1)
        picked = ref[torch.arange(len(s.tokens)), torch.tensor(s.tokens)]
        torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.double), picked, rtol=0, atol=1e-4)
        assert max(s.tokens) < len(tok)
        if temperature == 0:
            assert s.tokens == ref.argmax(-1).tolist()
        if top_p < 1:  # every drawn token lies in the nucleus of the reference distribution
            p = ref.exp()
            mass_before = (p * (p > p[torch.arange(len(s.tokens)), torch.tensor(s.tokens)][:, None])).sum(-1)
            assert (mass_before < top_p + 1e-6).all()


def test_model_batching_and_continuous_refill_do_not_change_samples():
    """Ragged prompts with samples ending at different steps (stop ids): all at once = 2 slots refilled from
    the queue = 1 slot (sampled); all at once = one prompt per call (greedy, whose samples carry no index)."""
    model, tok = M.load_model("tiny", seed=1)
    M.init_weights(model, seed=1, std=0.3)
    prompts = [tok.encode(t) for t in ("x = 1", "print('hello world')", "ab", "import this\n" * 3)]
    limits = [20, 12, 25, 9]  # max_new_tokens per prompt
    kw = dict(stop_token_ids=list(range(0, 256, 17)), tokenizer=tok, seed=11)
    runs = [M.generate(model, prompts, n=3, max_new_tokens=limits, max_batch_size=b, **kw) for b in (None, 2, 1)]
    greedy = [M.generate(model, prompts, max_new_tokens=limits, temperature=0, **kw)]
    greedy.append([s for p, m in zip(prompts, limits) for s in M.generate(model, [p], max_new_tokens=m,
                                                                          temperature=0, **kw)])
    assert len({len(s.tokens) for s in runs[0]}) > 3  # samples really finish at different steps
    assert {s.finish_reason for s in runs[0] + greedy[0]} == {"stop", "length"}
    assert all(len(s.tokens) <= limits[k // 3] for k, s in enumerate(runs[0]))
    assert all(len(s.tokens) == limits[k // 3] for k, s in enumerate(runs[0]) if s.finish_reason == "length")
    for a, *others in [*zip(*runs), *zip(*greedy)]:
        for b in others:
            assert (a.tokens, a.finish_reason) == (b.tokens, b.finish_reason)
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-4)


def test_model_prefill_budget_limited_refills_keep_idle_slots_in_range(monkeypatch):
    """When the prefill budget admits fewer prompts than there are free decode rows, prompts join the running batch
    one by one, every 8 steps; samples equal one-prompt calls."""
    model, tok = M.load_model("tiny", seed=2)
    M.init_weights(model, seed=2, std=0.3)
    prompts = [tok.encode("p" * (30 + k)) for k in range(12)]
    kw = dict(max_new_tokens=60, temperature=0, tokenizer=tok, stop_token_ids=[7, 19, 33, 41])
    alone = [M.generate(model, [p], **kw)[0] for p in prompts]
    monkeypatch.setattr(M, "PREFILL_TOKENS", 40)  # one prompt per prefill
    together = M.generate(model, prompts, max_batch_size=8, **kw)
    assert [(s.tokens, s.finish_reason) for s in together] == [(s.tokens, s.finish_reason) for s in alone]


def test_model_seeds_reproduce_and_differ():
    model, tok = M.load_model("tiny")
    prompts = [tok.encode("seed")]
    a, b, c = (M.generate(model, prompts, n=4, max_new_tokens=16, tokenizer=tok, seed=s) for s in (5, 5, 6))
    assert [s.tokens for s in a] == [s.tokens for s in b]
    assert [s.tokens for s in a] != [s.tokens for s in c]
    assert len({tuple(s.tokens) for s in a}) == 4  # the n samples of one prompt differ


def test_model_stop_ids_and_strings_end_samples():
    model, tok = M.load_model("tiny", seed=2)
    M.init_weights(model, seed=2, std=0.3)
    prompt = [tok.encode("Assistant: <think>")]
    free = M.generate(model, prompt, max_new_tokens=40, tokenizer=tok, seed=4)[0]
    assert free.finish_reason == "length" and len(free.tokens) == 40
    stop_id = free.tokens[9]
    cut = free.tokens.index(stop_id)
    by_id = M.generate(model, prompt, max_new_tokens=40, stop_token_ids=[stop_id], tokenizer=tok, seed=4)[0]
    assert (by_id.tokens, by_id.finish_reason) == (free.tokens[:cut + 1], "stop")
    assert by_id.logprobs == pytest.approx(free.logprobs[:cut + 1], abs=1e-5)
    text = tok.decode(free.tokens)
    stop = text[15:18]  # a stop string that first completes somewhere inside the free-running sample
    by_str = M.generate(model, prompt, max_new_tokens=40, stop_strings=["never", stop], tokenizer=tok, seed=4)[0]
    assert by_str.finish_reason == "stop" and free.tokens[:len(by_str.tokens)] == by_str.tokens
    assert stop in tok.decode(by_str.tokens) and stop not in tok.decode(by_str.tokens[:-1])
    with pytest.raises(ValueError, match="tokenizer"):
        M.generate(model, prompt, max_new_tokens=4, stop_strings=["x"])


def test_model_generate_leaves_model_untouched():
    model, tok = M.load_model("tiny")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    M.generate(model, [tok.encode("hi")], n=2, max_new_tokens=8, tokenizer=tok)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- the paged sampler: block pool, sharing, preemption, stop_after (issue 10, issue 13 item 1) ----------------

# 27, 1, 16 (exactly one 16-token block), 52 and 47 tokens: full blocks shared by n samples, partial last blocks
_SAMPLER_TEXTS = ("def f(x):" * 3, "a", "x" * 16, "hello world, " * 4, "y" * 47)


def _model_sampler_setup(seed=3):
    model, tok = M.load_model("tiny", seed=seed)
    M.init_weights(model, seed=seed, std=0.3)  # std 0.02 leaves attention too flat to show a wrong key
    return model, tok, [tok.encode(t) for t in _SAMPLER_TEXTS]


def _model_pool_gib(model, blocks, block_size=16):
    """kv_cache_gib that gives an fp32 Sampler exactly this many blocks."""
    return blocks * block_size * M.kv_bytes_per_token(model.config, torch.float32) / 2 ** 30


def _model_assert_logprobs_match_full_forward(model, tok, prompts, samples, n):
    for k, s in enumerate(samples):
        prompt = prompts[k // n]
        with torch.no_grad():
            logits = _model_logits(model, torch.tensor([prompt + s.tokens]))[0, len(prompt) - 1:-1].double()
        logits[:, len(tok):] = -float("inf")
        ref = logits.log_softmax(-1)[torch.arange(len(s.tokens)), torch.tensor(s.tokens)]
        torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.double), ref, rtol=0, atol=1e-4)


def test_model_paged_sampler_logprobs_match_full_forward_with_sharing_and_preemption():
    """16-token blocks, a pool of 9 (the longest sequence alone needs 7): samples are preempted and recomputed,
    n=3 siblings share their prompt's full blocks and write their own copies of its partial block (siblings
    diverge at their first token, so a write into a shared block would corrupt the others' keys), and stop ids and
    strings end samples at different steps. Every logprob equals a full forward of prompt + sample."""
    model, tok, prompts = _model_sampler_setup()
    kw = dict(n=3, max_new_tokens=40, tokenizer=tok, seed=7, stop_token_ids=list(range(0, 256, 23)))
    free = M.generate(model, prompts, **kw)
    text = tok.decode(free[2].tokens)
    stop = text[len(text) // 2:len(text) // 2 + 2]  # completes inside sample 2 (at least)
    sampler = M.Sampler(model, kv_cache_gib=_model_pool_gib(model, 9), block_size=16)
    samples = sampler.generate(prompts, stop_strings=[stop], **kw)
    st = sampler.stats
    assert st["num_blocks"] == 9 and st["preemptions"] > 0 and st["prefills"] > 1 and st["blocks_in_use"] == 0
    assert {s.finish_reason for s in samples} == {"stop", "length"}
    assert any(stop in tok.decode(s.tokens) for s in samples)
    _model_assert_logprobs_match_full_forward(model, tok, prompts, samples, 3)


def test_model_paged_samples_do_not_depend_on_pool_size_batch_cap_or_admission_order(monkeypatch):
    """The same samples from: the one-shot default (256-token blocks, everything admitted at once); 16-token blocks
    in a pool so small that samples are preempted and readmitted after later ones; a cap of 2 rows (groups of 3
    split, the third sibling prefilled alone later); one prompt per prefill."""
    model, tok, prompts = _model_sampler_setup()
    kw = dict(n=3, max_new_tokens=30, tokenizer=tok, seed=5, stop_token_ids=list(range(3, 256, 29)))
    runs = [M.generate(model, prompts, **kw)]
    tiny = M.Sampler(model, kv_cache_gib=_model_pool_gib(model, 7), block_size=16)
    runs.append(tiny.generate(prompts, **kw))
    assert tiny.stats["preemptions"] > 0
    runs.append(M.Sampler(model, block_size=16).generate(prompts, max_batch_size=2, **kw))
    monkeypatch.setattr(M, "PREFILL_TOKENS", 1)
    one_each = M.Sampler(model, block_size=32)
    runs.append(one_each.generate(prompts, **kw))
    assert one_each.stats["prefills"] >= len(prompts)
    assert len({len(s.tokens) for s in runs[0]}) > 3 and {s.finish_reason for s in runs[0]} == {"stop", "length"}
    for a, *others in zip(*runs):
        for b in others:
            assert (a.tokens, a.finish_reason) == (b.tokens, b.finish_reason)
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-4)


def test_model_cuda_schedule_padding_rows_and_launch_shapes_leave_samples_unchanged(monkeypatch):
    """The decode schedule CUDA runs, on the CPU: batches padded to graph buckets (15 sequences decode as 16 rows,
    the padding row writing and reading only the scratch block), split-bucketed launch shapes, in a pool small enough
    to preempt. The graph capture itself needs a GPU (bench.py gpu)."""
    model, tok, prompts = _model_sampler_setup()
    kw = dict(n=3, max_new_tokens=20, tokenizer=tok, seed=7, stop_token_ids=list(range(0, 256, 23)))
    plain = M.generate(model, prompts, **kw)
    monkeypatch.setattr(M._Rollout, "_decode", lambda self, B, max_length: self._forward_decode(B, max_length))
    shapes = []
    paged_decode = kernels.paged_decode
    monkeypatch.setattr(kernels, "paged_decode", lambda q, *a: shapes.append((q.shape[0], a[-1])) or paged_decode(q, *a))
    for blocks in (None, 9):
        sampler = M.Sampler(model, kv_cache_gib=blocks and _model_pool_gib(model, blocks), block_size=16)
        sampler.graphed = True
        samples = sampler.generate(prompts, **kw)
        st = sampler.stats
        assert st["blocks_in_use"] == 0 and (st["preemptions"] > 0) == (blocks is not None)
        assert [(s.tokens, s.finish_reason) for s in samples] == [(s.tokens, s.finish_reason) for s in plain]
        _model_assert_logprobs_match_full_forward(model, tok, prompts, samples, 3)
    assert (16, 512) in shapes and st["graph_rows"] == st["decoded_rows"]  # 15 rows ran as 16; one 512-key split


def test_model_graph_pool_is_primed_with_the_largest_bucket(monkeypatch):
    """On CUDA the first capture into a fresh graph pool is of max_batch_size rows, so that smaller buckets reuse its
    temporaries. Simulated on the CPU with a stand-in graph that reruns the captured forward into its static output
    (as a replay does): the primed graph's padding rows must leave every sample unchanged, and graphs are reused
    across calls."""
    model, tok, prompts = _model_sampler_setup()
    kw = dict(n=3, max_new_tokens=20, tokenizer=tok, seed=7, stop_token_ids=list(range(0, 256, 23)))
    plain = M.generate(model, prompts, **kw)
    captured = []

    class Replay:
        def __init__(self, rollout, B, max_length):
            self.run = lambda: rollout._forward_decode(B, max_length)
            self.out = self.run()

        def replay(self):
            for static, new in zip(self.out, self.run()):
                static.copy_(new)

    def capture(self, key):
        captured.append(key[0])
        self.s.graph_pool = self.s.graph_pool or "pool"
        graph = Replay(self, *key[:2])
        self.s.graphs[key] = graph, graph.out
    monkeypatch.setattr(M._Rollout, "_capture", capture)
    sampler = M.Sampler(model, block_size=16, max_batch_size=32)
    sampler.graphed = True
    for _ in range(2):
        samples = sampler.generate(prompts, **kw)
        assert [(s.tokens, s.finish_reason) for s in samples] == [(s.tokens, s.finish_reason) for s in plain]
        _model_assert_logprobs_match_full_forward(model, tok, prompts, samples, 3)
    assert captured[0] == 32 and len(captured) > 2 and captured.count(32) == 1  # primed once, then reused


def test_model_block_allocator_shares_and_frees_each_block_once():
    alloc = M.BlockAllocator(6)
    prompt = alloc.take(2)
    alloc.share(prompt * 2)  # three samples hold the prompt's full blocks
    tails = [alloc.take(1) for _ in range(3)]  # and one own block each
    assert alloc.in_use == 5 and len(set(prompt + sum(tails, []))) == 5
    for i, tail in enumerate(tails):
        alloc.release(prompt + tail)
        assert alloc.in_use == (5 - i - 1 if i < 2 else 0)  # the shared blocks go back with the last holder only
    assert sorted(alloc.free) == list(range(6))  # each block returned once: no duplicates, no leak


def test_model_sampler_counters_match_the_schedule():
    """Greedy, no stop, fixed lengths: each sample's first token comes from the prefill and the other m - 1 from
    decode steps that attend over prompt + 1 .. prompt + m - 1 keys."""
    model, tok, prompts = _model_sampler_setup()
    limits = [5, 17, 9, 30, 12]
    sampler = M.Sampler(model, block_size=16)
    samples = sampler.generate(prompts, n=2, max_new_tokens=limits, temperature=0)
    st = sampler.stats
    assert [len(s.tokens) for s in samples] == [m for m in limits for _ in range(2)]
    assert st["running_rows"] == sum(2 * (m - 1) for m in limits)
    assert st["keys_needed"] == sum(2 * (len(p) + j) for p, m in zip(prompts, limits) for j in range(1, m))
    assert st["keys_read"] >= st["keys_needed"] and st["decoded_rows"] >= st["running_rows"]
    assert st["peak_running"] == 10 and st["blocks_in_use"] == 0 and st["preemptions"] == 0


def test_model_sampler_serves_many_calls_and_follows_in_place_weight_updates():
    model, tok, prompts = _model_sampler_setup()
    kw = dict(n=2, max_new_tokens=20, tokenizer=tok, seed=1)
    sampler = M.Sampler(model, block_size=16)
    first = sampler.generate(prompts, **kw)
    assert [s.tokens for s in first] == [s.tokens for s in M.generate(model, prompts, **kw)]
    with torch.no_grad():  # what the trainer's optimizer step does: same tensors, new values
        for p in model.parameters():
            p.mul_(1.1)
    second = sampler.generate(prompts, **kw)
    assert [s.tokens for s in second] == [s.tokens for s in M.generate(model, prompts, **kw)]
    assert [s.tokens for s in second] != [s.tokens for s in first]
    _model_assert_logprobs_match_full_forward(model, tok, prompts, second, 2)
    assert sampler.stats["blocks_in_use"] == 0


def test_model_stop_strings_count_only_after_the_stop_after_marker():
    """Issue 13: with stop_after, a stop string counts only in text generated after the marker's first occurrence.
    From a free-running sample: a stop string that occurs before and after a marker; the sample ends at the first
    occurrence after the marker with stop_after, and at the very first without."""
    model, tok = M.load_model("tiny", seed=2)
    M.init_weights(model, seed=2, std=0.3)
    prompt = [tok.encode("Assistant: <think>")]
    free = M.generate(model, prompt, max_new_tokens=60, tokenizer=tok, seed=4)[0]
    pieces = [tok.decode([t]) for t in free.tokens]
    ascii_at = [i for i, p in enumerate(pieces) if len(p) == 1 and p.isprintable() and p.isascii()]
    i, j = next((i, j) for i in ascii_at for j in ascii_at if i < j and pieces[i] == pieces[j])
    stop = pieces[i]
    marker = next(pieces[m] for m in ascii_at if i < m < j and pieces[m] != stop and pieces.index(pieces[m]) == m)

    def first_end(after):  # the reference: decode growing prefixes of the free-running sample
        for k in range(1, len(free.tokens) + 1):
            text = tok.decode(free.tokens[:k])
            if after is not None:
                text = text[text.index(after) + len(after):] if after in text else ""
            if stop in text:
                return k
        return len(free.tokens)

    assert first_end(None) < first_end(marker)
    for after in (None, marker, "never in this text"):
        got = M.generate(model, prompt, max_new_tokens=60, stop_strings=[stop], stop_after=after, tokenizer=tok,
                         seed=4)[0]
        end = first_end(after)
        assert got.tokens == free.tokens[:end] and got.logprobs == pytest.approx(free.logprobs[:end], abs=1e-5)
        assert got.finish_reason == ("length" if after == "never in this text" else "stop")
    with pytest.raises(ValueError, match="^stop_strings and stop_after need the tokenizer"):
        M.generate(model, prompt, max_new_tokens=4, stop_strings=["x"], stop_after="y")


@pytest.mark.parametrize("bad", ["pool_too_small", "block_size", "stop_after_without_tokenizer", "limits"])
def test_model_sampler_bad_input_gives_one_line_error(bad):
    model, tok, prompts = _model_sampler_setup()
    with pytest.raises(ValueError, match="^[^\n]+$"):
        if bad == "pool_too_small":  # the longest sequence, 52 + 40 + 8 positions, needs 7 blocks of 16
            M.Sampler(model, kv_cache_gib=_model_pool_gib(model, 6), block_size=16).generate(prompts, max_new_tokens=40)
        elif bad == "block_size":
            M.Sampler(model, block_size=24)
        elif bad == "stop_after_without_tokenizer":
            M.generate(model, prompts, max_new_tokens=4, stop_after="</think>")
        else:
            M.generate(model, prompts, n=2, max_new_tokens=[4, 5, 6])


def test_model_save_model_round_trips_through_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = M.load_model("tiny", seed=4)
    M.save_model(model, tok, tmp_path / "ckpt")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    theirs = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    assert theirs.keys() == model.state_dict().keys()
    assert all(torch.equal(theirs[k], v) for k, v in model.state_dict().items())
    ids = torch.randint(0, len(tok), (2, 50), generator=torch.Generator().manual_seed(0))
    again, tok2 = M.load_model(str(tmp_path / "ckpt"))
    with torch.no_grad():
        assert _model_rel_err(hf(ids).logits, _model_logits(model, ids)) < 1e-4
        assert torch.equal(_model_logits(again, ids), _model_logits(model, ids))
    text = "def f(x):\n\treturn 'héllo' + \"🙂\" <|endoftext|>\x00\x7f"
    for t in (AutoTokenizer.from_pretrained(tmp_path / "ckpt"), tok2):
        assert t.encode(text) == tok.encode(text) and t.decode(tok.encode(text)) == text
        assert t.eos_token_id == tok.eos_token_id


def test_model_tiny_tokenizer_round_trips_every_string():
    model, tok = M.load_model("tiny")
    assert tok.eos_token == "<|endoftext|>" and len(tok) < model.config.vocab_size
    assert model.config.max_position_embeddings >= 16384
    for text in ["", " leading space", "tabs\tand\nnewlines\r\n", "ünïcödé ∑ 中文 🙂🙃", "\x00\x01\x7f\xff",
                 "<|endoftext|> inside", "   \n\n  trailing  "]:
        assert tok.decode(tok.encode(text)) == text


def test_model_offline_hub_id_gives_one_line_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    with pytest.raises(SystemExit) as e:
        M.load_model("Qwen2.5-3B")
    message = str(e.value)
    assert "\n" not in message and "Qwen/Qwen2.5-3B" in message and "local directory" in message


# --- model families: Qwen3 dense, Llama-3.2 (issue 12) --------------------------------------------------------

# Qwen3's 26 added tokens in their order (ids 151643-151668) with their "special" flags from its tokenizer_config.json
_QWEN3_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
_QWEN3_PLAIN = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]


def _model_qwen3_tokenizer(path):
    """Qwen3's tokenizer files in miniature, built offline: byte-level BPE (a few merges, so "think" is one piece)
    under its Qwen2Tokenizer class, then its added tokens with their flags, in tokenizer.json and
    tokenizer_config.json as the real files have them."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import AutoTokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    merges = [("t", "h"), ("th", "i"), ("thi", "n"), ("thin", "k")]
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab |= {a + b: len(vocab) + i for i, (a, b) in enumerate(merges)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    added = _QWEN3_SPECIAL + _QWEN3_PLAIN
    tok.add_tokens([AddedToken(t, special=t in _QWEN3_SPECIAL, normalized=False) for t in added])
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    flags = dict(lstrip=False, normalized=False, rstrip=False, single_word=False)
    (path / "tokenizer_config.json").write_text(json.dumps(dict(
        add_prefix_space=False, added_tokens_decoder={str(len(vocab) + i): dict(content=t, special=t in _QWEN3_SPECIAL,
                                                                                **flags) for i, t in enumerate(added)},
        additional_special_tokens=_QWEN3_SPECIAL[1:], bos_token=None, clean_up_tokenization_spaces=False,
        eos_token="<|im_end|>", errors="replace", model_max_length=131072, pad_token="<|endoftext|>",
        split_special_tokens=False, tokenizer_class="Qwen2Tokenizer", unk_token=None)))
    return AutoTokenizer.from_pretrained(path)


def _model_llama3_tokenizer():
    """Llama-3.x instruct's shape: byte-level tokens, then BOS and three end tokens; its length is the LM head's
    (no padded rows)."""
    from tokenizers import AddedToken
    tok = M.byte_tokenizer().backend_tokenizer  # 257 tokens: <|endoftext|> stands in for a reserved token
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")])
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def _model_family(family: str, tied: bool, tmp_path):
    """(a transformers config of the family's real shape, in miniature; its tokenizer)."""
    from transformers import LlamaConfig, Qwen3Config
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=tied)
    if family == "qwen3":
        tok = _model_qwen3_tokenizer(tmp_path / "qwen3-tokenizer")
        return Qwen3Config(**common, vocab_size=320, head_dim=32, rope_theta=1e6, attention_bias=False,  # 32 != 64/4
                           use_sliding_window=False, max_window_layers=2, bos_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id), tok
    tok = _model_llama3_tokenizer()
    ends = tok.convert_tokens_to_ids(["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])
    # llama3 scaling with a small original context, so all three frequency bands occur within 200 positions
    return LlamaConfig(**common, vocab_size=len(tok), head_dim=16, rope_theta=5e5, rope_scaling=dict(
        rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64), bos_token_id=tok.bos_token_id, eos_token_id=ends), tok


@pytest.mark.parametrize("family,tied", [("qwen3", True), ("qwen3", False), ("llama3", True), ("llama3", False)],
                         ids=["qwen3-tied", "qwen3-untied", "llama3.2-tied", "llama3.1-untied"])
def test_model_family_matches_transformers_and_round_trips(family, tied, tmp_path):
    """A tiny random checkpoint transformers writes for the family loads in load_model: logits match transformers'
    to fp32 rounding, greedy decoding that stops at the config's EOS ids equals transformers' generate, sampled
    logprobs are normalised over exactly len(tokenizer) rows, and save_model's output reloads in transformers as
    the same class with identical logits, and in load_model with the same config (an EOS list included)."""
    from transformers import AutoModelForCausalLM
    hf_config, tok = _model_family(family, tied, tmp_path)
    hf = _model_hf_checkpoint(hf_config, tmp_path / "hf", tok)
    ours, ours_tok = M.load_model(str(tmp_path / "hf"))
    c = ours.config
    assert (c.model_type, c.qk_norm, c.qkv_bias, c.head_dim) == (hf_config.model_type, family == "qwen3", False,
                                                                 hf_config.head_dim)
    assert c.eos_token_id == hf_config.eos_token_id and (ours.lm_head.weight is ours.embed_tokens.weight) == tied
    assert len(ours_tok) == c.vocab_size if family == "llama3" else len(ours_tok) < c.vocab_size
    ids = torch.randint(0, c.vocab_size, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        assert _model_rel_err(_model_logits(ours, ids), want) < 1e-4
    ends = c.eos_token_id if isinstance(c.eos_token_id, list) else [c.eos_token_id]
    prompts = [[5, 17, 200, 3], [9] * 11, list(range(40, 63)), [250]]
    for prompt, s in zip(prompts, M.generate(ours, prompts, max_new_tokens=24, temperature=0.0, stop_token_ids=ends)):
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, pad_token_id=0)
        assert s.tokens == ref[0, len(prompt):].tolist()
    s = M.generate(ours, prompts[:1], max_new_tokens=8, tokenizer=ours_tok, seed=3)[0]
    with torch.no_grad():
        logits = _model_logits(ours, torch.tensor([prompts[0] + s.tokens]))[0, len(prompts[0]) - 1:-1]
    ref = logits[:, :len(ours_tok)].double().log_softmax(-1)[torch.arange(8), torch.tensor(s.tokens)]
    torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.double), ref, rtol=0, atol=1e-4)
    M.save_model(ours, ours_tok, tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    assert type(again) is type(hf) and again.config.eos_token_id == hf_config.eos_token_id
    reloaded, _ = M.load_model(str(tmp_path / "saved"))
    assert reloaded.config == c
    with torch.no_grad():
        assert torch.equal(again(ids).logits, want)
        assert torch.equal(_model_logits(reloaded, ids), _model_logits(ours, ids))


def test_model_qwen3_base_tokenises_think_as_text(tmp_path):
    """Qwen3's <think>/</think> are added tokens (untrained in the base models). Loaded by a name with -Base, the
    R1 template's <think> is plain text, their ids are past len(tokenizer) (never sampled), and a checkpoint keeps
    that. Other Qwen3 models keep the tokens, and azr's decoding (skip_special_tokens=True) keeps a generated
    </think> (flagged special: false), so the format reward sees it."""
    from transformers import AutoTokenizer
    hf_config, tok = _model_family("qwen3", True, tmp_path)
    _model_hf_checkpoint(hf_config, tmp_path / "Qwen3-tiny-Base", tok)
    shutil.copytree(tmp_path / "Qwen3-tiny-Base", tmp_path / "Qwen3-tiny")
    think, end = tok.convert_tokens_to_ids(["<think>", "</think>"])
    prompt, response = azr.R1_TEMPLATE.format("f(3)?"), " 3 + 1 = 4.</think> <answer>4</answer>"

    def encode(t, text):  # as azr's Policy.encode
        return t(text, add_special_tokens=False)["input_ids"]

    as_files_say = AutoTokenizer.from_pretrained(tmp_path / "Qwen3-tiny-Base")
    model, instruct = M.load_model(str(tmp_path / "Qwen3-tiny"))
    for t in (as_files_say, instruct):
        assert encode(t, prompt)[-1] == think and len(t) == think + 2
    generated = encode(instruct, response) + [instruct.eos_token_id]
    assert end in generated
    text = instruct.decode(generated, skip_special_tokens=True)
    assert text == response and azr.format_ok(text)

    _, base = M.load_model(str(tmp_path / "Qwen3-tiny-Base"))
    M.save_model(model, base, tmp_path / "ckpt" / "model")
    for t in (base, M.load_model(str(tmp_path / "ckpt" / "model"))[1],
              AutoTokenizer.from_pretrained(tmp_path / "ckpt" / "model")):
        ids = encode(t, prompt)
        assert t.convert_ids_to_tokens(ids[-3:]) == ["<", "think", ">"] and t.decode(ids) == prompt
        assert len(t) == think < end  # both rows masked by the sampler and the trainer
        assert encode(t, "<|im_end|><tool_call>") == encode(instruct, "<|im_end|><tool_call>")  # others untouched
        generated = encode(t, response) + [t.eos_token_id]
        assert t.decode(generated, skip_special_tokens=True) == response


def test_model_short_names_resolve_offline_and_are_documented(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    for name, repo in [("Qwen3-4B-Base", "Qwen/Qwen3-4B-Base"), ("Llama-3.2-1B", "meta-llama/Llama-3.2-1B"),
                       ("Qwen2.5-Coder-0.5B-Instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct")]:
        with pytest.raises(SystemExit, match=f"hub id '{repo}'"):
            M.load_model(name)
    readme = (REPO / "README.md").read_text()
    assert [name for name in M.HUB_IDS if f"`{name}`" not in readme] == []


@pytest.mark.parametrize("model_type,kw,reason", [
    ("qwen3_moe", {}, "mixture-of-experts"),
    ("qwen3", dict(use_sliding_window=True, sliding_window=64, max_window_layers=1, num_hidden_layers=2),
     "sliding-window"),
    ("qwen3", dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0,
                                        original_max_position_embeddings=32768)), "'yarn'"),
    ("qwen3", dict(attention_bias=True), "attention_bias"),
], ids=["moe", "sliding-window", "yarn", "bias"])
def test_model_unimplemented_architectures_give_one_line_errors(model_type, kw, reason, tmp_path):
    from transformers import AutoConfig
    AutoConfig.for_model(model_type, **kw).save_pretrained(tmp_path)
    with pytest.raises(SystemExit) as e:
        M.load_model(str(tmp_path))
    assert "\n" not in str(e.value) and "not implemented" in str(e.value) and reason in str(e.value)


# ==============================================================================================================
# kernels/: fused logprob + entropy against float64 (issue 4)
# ==============================================================================================================

_KERNELS_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# x max|truth|. fp32: backward recomputes logits, and numpy (the interpreter) rounds a logit differently at
# another tile position; planted ~200 logits amplify that ulp. bf16: the interpreter truncates fp32 -> bf16 casts.
_KERNELS_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
_KERNELS_IMPLS = {"triton": fused_logprobs.linear_logprobs_triton, "reference": reference.linear_logprobs_reference}


@pytest.fixture
def _kernels_small_chunks(monkeypatch, request):
    """Shrink the chunk sizes so that test shapes cross every chunk boundary: several vocabulary splits in the
    Triton forward, several (non tile-aligned) vocabulary chunks in its backward, several token chunks in the
    reference."""
    if request.node.callspec.params["impl"] == "triton" and _KERNELS_DEVICE == "cpu" and not fused_logprobs.INTERPRET:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; set it at the top of the test module")
    monkeypatch.setattr(fused_logprobs, "VOCAB_PER_PROGRAM", 256)
    monkeypatch.setattr(fused_logprobs, "DZ_CHUNK_ELEMENTS", 37 * 300)
    monkeypatch.setattr(reference, "REFERENCE_CHUNK_ELEMENTS", 16 * 1031)


def _kernels_naive(hidden, weight, targets, temperature, vocab_size):
    """What a trainer would write: full logits in the input dtype, softmax in fp32 (fp64 for the ground truth)."""
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    logits = (hidden @ weight[:vocab_size].T).to(torch.promote_types(hidden.dtype, torch.float32)) / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def _kernels_eval(fn, hidden, weight, targets, temperature, vocab_size, g_logprobs, g_entropy):
    """Outputs and gradients of the RL-style loss sum(g_logprobs * logprobs + g_entropy * entropy); hidden is
    passed as a column-major view to exercise strides."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logprobs, entropy = fn(h.T.contiguous().T, w, targets, temperature, vocab_size)
    (g_logprobs.to(logprobs.dtype) * logprobs + g_entropy.to(entropy.dtype) * entropy).sum().backward()
    return {"logprobs": logprobs, "entropy": entropy, "d_hidden": h.grad, "d_weight": w.grad}


def _kernels_assert_no_worse(got, naive, truth, tol):
    """Cut Cross-Entropy's criterion: elementwise, |truth - got| <= |truth - naive same-dtype| + tol * max|truth|."""
    for key, true in truth.items():
        assert got[key].dtype == (torch.float32 if key in ("logprobs", "entropy") else naive[key].dtype), key
        err, naive_err = (got[key].double() - true).abs(), (naive[key].double() - true).abs()
        excess = (err - naive_err - tol * true.abs().max()).max().item()
        assert excess <= 0, f"{key}: error exceeds the naive error + tolerance by {excess:.3g}"


def _kernels_inputs(dtype, planted, n=37, d=24, V=1031, vocab_size=1000):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(V, d, generator=g) * 0.5
    if planted:  # Cut Cross-Entropy's stress: every logit ~144 (exp overflows fp32 past 88), one dominant row
        hidden[:, 0], weight[:, 0] = 12.0, 12.0
        rows = (57 * torch.arange(n // 2) + 3) % vocab_size  # spread over all vocabulary splits
        weight[rows] = hidden[: n // 2]
    weight[vocab_size:] = 30.0  # padded LM-head rows: they would dominate every softmax if they leaked in
    targets = torch.randint(0, vocab_size, (n,), generator=g)
    if planted:
        targets[: n // 4] = rows[: n // 4]  # log p close to 0 for these, far below 0 for the others
    g_logprobs, g_entropy = torch.randn(n, generator=g), torch.randn(n, generator=g)
    to = dict(device=_KERNELS_DEVICE)
    return (hidden.to(dtype=dtype, **to), weight.to(dtype=dtype, **to), targets.to(**to), g_logprobs.to(**to),
            g_entropy.to(**to))


@pytest.mark.parametrize("impl", list(_KERNELS_IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("planted", [False, True], ids=["random", "planted"])
def test_kernels_logprobs_entropy_and_grads_match_float64(_kernels_small_chunks, impl, dtype, planted):
    """Odd shape (N=37, d=24, V=1031), 31 padded vocabulary rows, temperature 0.7, per-token loss weights on both
    outputs: values and gradients against float64, no worse than a naive same-dtype implementation."""
    hidden, weight, targets, g_lp, g_ent = _kernels_inputs(dtype, planted)
    args = (targets, 0.7, 1000, g_lp, g_ent)
    truth = _kernels_eval(_kernels_naive, hidden.double(), weight.double(), *args)
    naive = _kernels_eval(_kernels_naive, hidden, weight, *args)
    got = _kernels_eval(_KERNELS_IMPLS[impl], hidden, weight, *args)
    _kernels_assert_no_worse(got, naive, truth, _KERNELS_TOL[dtype])
    assert torch.all(got["d_weight"][1000:] == 0), "padded vocabulary rows must get no gradient"
    assert torch.isfinite(got["logprobs"]).all() and torch.isfinite(got["entropy"]).all()


@pytest.mark.parametrize("impl", list(_KERNELS_IMPLS))
def test_kernels_tied_embedding_gets_both_gradients(_kernels_small_chunks, impl):
    """weight is also the input embedding: its gradient is the sum of the LM-head and the embedding paths.
    Only logprobs enter the loss, so the entropy's upstream gradient is None."""
    hidden, weight, targets, g_lp, _ = _kernels_inputs(torch.float32, planted=False, vocab_size=1031)
    token_ids = targets.roll(1)
    proj = torch.randn(24, 24, generator=torch.Generator().manual_seed(1)).to(_KERNELS_DEVICE) / 24**0.5

    def grads(fn, embedding):
        embedding = embedding.clone().requires_grad_()
        mixed = torch.tanh(embedding[token_ids] @ proj.to(embedding.dtype))
        logprobs, _ = fn(mixed, embedding, targets, 1.0, None)
        (g_lp.to(logprobs.dtype) * logprobs).sum().backward()
        return {"d_weight": embedding.grad}

    truth = grads(_kernels_naive, weight.double())
    _kernels_assert_no_worse(grads(_KERNELS_IMPLS[impl], weight), grads(_kernels_naive, weight), truth, 1e-5)


def test_kernels_dispatch_uses_reference_on_cpu(monkeypatch):
    def triton_must_not_run(*args):
        raise AssertionError("CPU tensors were dispatched to the Triton kernels")

    monkeypatch.setattr(fused_logprobs, "linear_logprobs_triton", triton_must_not_run)
    hidden, weight, targets, _, _ = (t.cpu() for t in _kernels_inputs(torch.float32, planted=False))
    got = kernels.linear_logprobs(hidden, weight, targets, temperature=0.7, vocab_size=1000)
    want = reference.linear_logprobs_reference(hidden, weight, targets, 0.7, 1000)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("bad", ["hidden_3d", "dtype_mismatch", "targets_shape", "vocab_size", "target_range"])
def test_kernels_bad_input_gives_one_line_error(bad):
    hidden, weight, targets = torch.randn(5, 8), torch.randn(20, 8), torch.randint(0, 16, (5,))
    kwargs = {"temperature": 1.0, "vocab_size": 16}
    if bad == "hidden_3d":
        hidden = hidden[None]
    elif bad == "dtype_mismatch":
        weight = weight.bfloat16()
    elif bad == "targets_shape":
        targets = targets[:4]
    elif bad == "vocab_size":
        kwargs["vocab_size"] = 21
    else:
        targets[0] = 17
    with pytest.raises(ValueError, match="^linear_logprobs: [^\n]+$"):
        kernels.linear_logprobs(hidden, weight, targets, **kwargs)


# --- paged decode attention (issue 10) -------------------------------------------------------------------------

# vs float64 SDPA, x max|truth|. fp16: input rounding; bf16: the interpreter truncates the fp32 -> bf16 output cast
_PAGED_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
_PAGED_IMPLS = {"triton": kernels.paged_attention.paged_attention_triton,
                "reference": kernels.paged_reference.paged_attention_reference}


def _paged_inputs(dtype, group, lengths, kv_heads=2, dim=24, block=16, seed=0):
    """A shuffled pool: each sequence's blocks lie anywhere in it. Blocks no sequence owns hold NaN and the stale
    slots past a sequence's length inside its last block hold 1e4, so reading either shows."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = [(n + block - 1) // block for n in lengths]
    width = max(n_blocks) + 1
    pool = torch.randperm(sum(n_blocks) + 5, generator=g)
    k_pool, v_pool = torch.randn(2, len(pool), block, kv_heads, dim, generator=g)
    table = torch.zeros(len(lengths), width, dtype=torch.int32)
    owned, used = torch.zeros(len(pool), dtype=torch.bool), 0
    for b, (n, nb) in enumerate(zip(lengths, n_blocks)):
        table[b, :nb] = pool[used:used + nb].int()
        used += nb
        owned[table[b, :nb].long()] = True
        for pool_ in (k_pool, v_pool):
            pool_[table[b, nb - 1], n - (nb - 1) * block:] = 1e4
    k_pool[~owned], v_pool[~owned] = float("nan"), float("nan")
    q = torch.randn(len(lengths), kv_heads * group, dim, generator=g)
    to = dict(device=_KERNELS_DEVICE)
    return (q.to(dtype=dtype, **to), k_pool.to(dtype=dtype, **to), v_pool.to(dtype=dtype, **to), table.to(**to),
            torch.tensor(lengths, dtype=torch.int32, **to))


def _paged_sdpa(q, k_pool, v_pool, table, lengths):
    """Plain SDPA in float64 over each sequence's keys gathered position by position."""
    block, out = k_pool.shape[1], []
    for b, n in enumerate(lengths.tolist()):
        pos = torch.arange(n, device=q.device)
        blocks = table[b, pos // block].long()
        k, v = (pool_[blocks, pos % block].double().transpose(0, 1) for pool_ in (k_pool, v_pool))
        out.append(torch.nn.functional.scaled_dot_product_attention(q[b].double()[:, None], k, v, enable_gqa=True)[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("impl", list(_PAGED_IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("group", [1, 2, 7])
def test_kernels_paged_decode_matches_sdpa_over_gathered_keys(monkeypatch, impl, dtype, group):
    """Ragged lengths (a single key, block boundaries 15/16/17, 31/32/33, several 32-key splits), GQA ratios 1/2/7,
    head_dim 24 (masked to 32): against float64 SDPA, and the kernel against its reference in the same dtype."""
    if impl == "triton" and _KERNELS_DEVICE == "cpu" and not fused_logprobs.INTERPRET:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; set it at the top of the test module")
    monkeypatch.setattr(kernels.paged_attention, "SPLIT_KEYS", 32)
    lengths = [1, 15, 16, 17, 31, 32, 33, 100]
    q, k_pool, v_pool, table, lens = _paged_inputs(dtype, group, lengths)
    got = _PAGED_IMPLS[impl](q, k_pool, v_pool, table, lens, max(lengths))
    truth = _paged_sdpa(q, k_pool, v_pool, table, lens)
    assert got.dtype == dtype and got.shape == q.shape and torch.isfinite(got).all()
    assert (got.double() - truth).abs().max() <= _PAGED_TOL[dtype] * truth.abs().max()
    if impl == "triton":
        ref = kernels.paged_reference.paged_attention_reference(q, k_pool, v_pool, table, lens)
        assert (got.double() - ref.double()).abs().max() <= _PAGED_TOL[dtype] * truth.abs().max()


def test_kernels_paged_decode_dispatch_uses_reference_on_cpu(monkeypatch):
    def triton_must_not_run(*args):
        raise AssertionError("CPU tensors were dispatched to the Triton kernel")

    monkeypatch.setattr(kernels.paged_attention, "paged_attention_triton", triton_must_not_run)
    q, k_pool, v_pool, table, lens = (t.cpu() for t in _paged_inputs(torch.float32, 2, [3, 40]))
    got = kernels.paged_decode(q, k_pool, v_pool, table, lens, 40)
    assert torch.equal(got, kernels.paged_reference.paged_attention_reference(q, k_pool, v_pool, table, lens))


# ==============================================================================================================
# azr.py: rules, rewards, TRR++, the loop end to end, evaluation (issues 5, 6)
# ==============================================================================================================

@pytest.fixture(scope="module")
def azr_executor():
    with Executor(workers=2, timeout=5.0, max_output_chars=400) as ex:
        yield ex


def _azr_cfg(**kw):
    return azr.Config(**{"model": "tiny", "device": "cpu", **kw})


# --- rewards and advantages against hand-computed values ------------------------------------------------------

def test_learnability_reward_eq4():
    assert azr.learnability_reward(0.25) == 0.75
    assert azr.learnability_reward(7 / 8) == pytest.approx(1 / 8)
    assert azr.learnability_reward(0.0) == 0.0 and azr.learnability_reward(1.0) == 0.0
    assert azr.learnability_reward(1.0, trivial=-0.5) == -0.5  # upstream's variant, --trivial-proposal-reward


def test_proposer_and_solver_rewards_eq6():
    assert azr.proposer_reward(valid=False, formatted=True, solve_rate=0.5) == -1.0
    assert azr.proposer_reward(valid=True, formatted=False, solve_rate=0.5) == -1.0
    assert azr.proposer_reward(valid=True, formatted=True, solve_rate=0.5) == 0.5
    assert azr.solver_reward(formatted=True, correct=True) == 1.0
    assert azr.solver_reward(formatted=True, correct=False) == -0.5
    assert azr.solver_reward(formatted=False, correct=True) == -1.0


def test_trr_advantages_match_float64_reference():
    rewards = [1.0, -0.5, -1.0, 1.0, 0.25]
    mu, sd = statistics.fmean(rewards), statistics.pstdev(rewards)
    assert azr.trr_advantages(rewards) == pytest.approx([(r - mu) / (sd + 1e-6) for r in rewards], abs=1e-12)
    assert azr.trr_advantages([-0.5] * 4) == [0.0] * 4  # all-equal rewards carry no signal
    assert azr.trr_advantages([1.0]) == [0.0]


def test_policy_loss_ppo_clip_and_entropy_bonus():
    logp = torch.tensor([-1.0, -1.0, -2.0], dtype=torch.float64)
    old = torch.tensor([-1.0, -1.5, -1.0], dtype=torch.float64)   # ratios 1, e^0.5, e^-1
    adv = torch.tensor([2.0, 1.0, -1.0], dtype=torch.float64)
    ent = torch.tensor([0.5, 0.25, 1.0], dtype=torch.float64)
    got = azr.policy_loss(logp, old, adv, ent, clip_ratio=0.2, entropy_coef=0.01)
    by_hand = (-2.0 * 1.0) + (-1.0 * 1.2) + max(1.0 * math.exp(-1.0), 1.0 * 0.8) - 0.01 * 1.75
    assert got.item() == pytest.approx(by_hand, abs=1e-12)


# --- answer format, parsing and validation against crafted model outputs --------------------------------------

def test_format_and_answer_extraction():
    good = " reasoning </think> <answer>```output\n3\n```</answer> trailing text"
    assert azr.format_ok(good) and azr.extract_answer(good) == "```output\n3\n```"
    assert not azr.format_ok("no think close <answer>1</answer>")
    assert not azr.format_ok(" x </think> no answer tags")
    assert azr.extract_answer(" a </think><answer>1</answer><answer>2</answer>") == "2"  # the last answer
    assert azr.extract_answer(" a </think><answer>unterminated") == "unterminated"  # upstream: the rest
    assert not azr.format_ok(" a </think><answer>unterminated")  # Eq. 6 stays strict
    assert azr.extract_answer(" no answer tag at all") is None


def test_check_program_rules():
    code = "import math\n# keep me\ndef solve(x):\n    return helper(x) + solve.__name__.count('s')\n" \
           "def helper(y):\n    return y\nclass C:\n    def m(self):\n        return solve(1)\n"
    out = azr.check_program(code)
    assert "# keep me" in out and "def f(x)" in out and "return f(1)" in out and "solve.__name__" not in out
    assert "f.__name__" in out and "def helper" in out  # call sites renamed, nested/extra defs allowed
    for bad in ["import os\ndef f(a):\n    return a", "from os.path import join\ndef f(a):\n    return a",
                "import numpy.random as r\ndef f(a):\n    return a", "def f(a):\n    return eval(a)",
                "def f(a):\n    return __import__('o' + 's')", "x = 1", "def f(a) return a",
                "def g(a):\n    return a\ndef f(b):\n    return b"]:
        with pytest.raises(azr.Invalid):
            azr.check_program(bad)
    stripped = azr.check_program("def f(a):\n    # c\n    return a\nprint(f(1))\nX = 3", strip=True)
    assert "print" not in stripped and "# c" not in stripped and "X = 3" not in stripped


def test_fenced_blocks_are_read_in_order():
    text = "```input\n1, 2\n```\nthen\n```python\ndef f(a, b):\n    return a\n```\n```\nuntagged\n```"
    assert azr.fenced_blocks(text, "python") == ["def f(a, b):\n    return a", "untagged"]
    assert azr.fenced_blocks(text, "input") == ["1, 2"]
    assert azr.parse_proposal(text) == ("def f(a, b):\n    return a", "1, 2")  # input block may come first


def test_parse_proposals_reject_unsafe_inputs():
    ok = "```python\ndef g(a, b):\n    return a * b\n```\n```input\n3, dict(k=2)\n```"
    assert azr.parse_proposal(ok) == ("def f(a, b):\n    return a * b", "3, dict(k=2)")
    for bad in ["```python\ndef f(a):\n    return a\n```\n```input\n4) or (True\n```",
                "```python\ndef f(a):\n    return a\n```\n```input\nopen('x')\n```",
                "```python\ndef f(a):\n    return a\n```\n```input\nf.__globals__\n```",
                "```python\ndef f(a):\n    return a\n```"]:
        with pytest.raises(ValueError):
            azr.parse_proposal(bad)
    ten = "".join(f"```input\n{i}\n```\n" for i in range(12)) + "```message\nadds one\n```"
    inputs, message = azr.parse_induction_proposal(ten, 10)
    assert inputs == [str(i) for i in range(2, 12)] and message == "adds one"  # the last ten
    with pytest.raises(azr.Invalid):
        azr.parse_induction_proposal("".join("```input\n1\n```\n" for _ in range(10)) + "```message\nm\n```", 10)
    with pytest.raises(azr.Invalid):
        azr.parse_induction_proposal("".join(f"```input\n{i}\n```\n" for i in range(10)), 10)


def test_check_proposals_runs_rules_4_and_5_in_the_sandbox(azr_executor):
    cfg = _azr_cfg()
    wrap = lambda code, i: f"```python\n{code}\n```\n```input\n{i}\n```"  # noqa: E731
    texts = [("deduction", wrap("def f(a):\n    return sorted(a)[::-1]", "[3, 1, 2]"), {}),
             ("abduction", wrap("def f(a):\n    return list({str(x) for x in range(a)})", "30"), {}),  # hash order
             ("deduction", wrap("def f(a):\n    return id(object()) + a", "1"), {}),  # id(); ids mod 1000 can agree
             ("deduction", wrap("def f(a):\n    return 'x' * a", "500"), {}),                          # too long
             ("deduction", wrap("def f(a):\n    return 1 / a", "0"), {}),                              # raises
             ("induction", "".join(f"```input\n{i}\n```\n" for i in range(10)) + "```message\nm\n```",
              dict(program="def f(a):\n    return a * 2"))]
    tasks = azr.check_proposals(azr_executor, texts, cfg)
    assert tasks[0] == dict(program="def f(a):\n    return sorted(a)[::-1]", input="[3, 1, 2]", output="[3, 2, 1]")
    assert tasks[1:5] == [None] * 4
    assert tasks[5]["outputs"] == [repr(2 * i) for i in range(10)]


def test_grading_is_type_aware_and_injection_proof(azr_executor):
    double = dict(program="def f(x):\n    return 2 * x", input="5", output="10")
    flag = dict(program="def f(x):\n    return x > 0", input="3", output="True")
    ind = dict(program="def f(a):\n    return a + 1", inputs=[str(i) for i in range(10)],
               outputs=[str(i + 1) for i in range(10)], message="m")
    always_eq = ("```python\nclass A:\n    def __eq__(self, o):\n        return True\n"
                 "def f(a):\n    return A()\n```")
    cases = [("deduction", double, "```output\n10\n```", True),
             ("deduction", double, "```output\n10.0\n```", False),       # 1 != 1.0
             ("deduction", flag, "```output\n1\n```", False),            # True != 1
             ("deduction", flag, "```output\nTrue\n```", True),
             ("deduction", double, "```output\n__import__('os')\n```", False),
             ("abduction", double, "```input\n5\n```", True),
             ("abduction", double, "```input\n4) or (True\n```", False),  # template injection
             ("abduction", double, "```input\n4\n```", False),
             ("induction", ind, "```python\ndef f(a):\n    return a + 1\n```", True),
             ("induction", ind, "```python\ndef f(a):\n    return a + 1 if a < 7 else 0\n```", False),
             ("induction", ind, always_eq, False),                       # __eq__ that always says yes
             ("induction", ind, "```python\nimport os\ndef f(a):\n    return a + 1\n```", False),
             ("induction", ind, "```python\ndef g(a):\n    return a + 1\ndef f(a):\n    return g(a)\n```", True),
             ("induction", ind, "```output_4\n5\n```\n```Python\ndef f(a):\n    return a + 1\n```", True),
             ("deduction", double, None, False)]
    verdicts = azr.grade_answers(azr_executor, [(k, t, a) for k, t, a, _ in cases])
    assert verdicts == [want for *_, want in cases]


# Real model text met these (fidelity review, real-weight runs): each went through parsing, grading and rewards.
_R1_ECHO = (" The instructions want my reasoning here and the result inside <answer> </answer> tags. f doubles 3, "
            "so the output is 6. </think> <answer>```output\n6\n```</answer>")


def test_r1_echo_inside_think_keeps_its_reward(azr_executor):
    """A response that repeats the instruction's "<answer> </answer>" while thinking is well formatted and its last
    answer is graded; cut at the first </answer> (what stopping there unconditionally kept), it would be -1."""
    task = dict(program="def f(x):\n    return 2 * x", input="3", output="6")
    cut = _R1_ECHO[:_R1_ECHO.index("</answer>") + len("</answer>")]
    verdicts = azr.grade_answers(azr_executor, [("deduction", task, azr.extract_answer(t)) for t in (_R1_ECHO, cut)])
    assert verdicts == [True, False]
    assert azr.solver_reward(azr.solver_format_ok("deduction", _R1_ECHO), verdicts[0]) == 1.0
    assert azr.solver_reward(azr.solver_format_ok("deduction", cut), verdicts[1]) == -1.0


def test_induction_answers_get_the_task_programs_imports(azr_executor):
    """As upstream, the task program's top-level imports run before an induction answer, in solver grading and in
    the learnability estimate alike (both go through grade_answers); banned imports in the answer still fail."""
    program = "import math\nfrom collections import Counter\ndef f(s):\n    return math.isqrt(len(s)) + max(Counter(s).values(), default=0)"
    inputs = ["'aab'", "'abcd'", "'zzzzzzzzz'", "''", "'x'", "'hello world'", "'aaaa'", "'abcabc'", "'mississippi'", "'qq'"]
    outputs = azr.validate_proposals(azr_executor, [(program, inputs)])[0]
    task = dict(program=program, inputs=inputs, outputs=outputs, message="m")
    uses_imports = "```python\ndef f(s):\n    return math.isqrt(len(s)) + max(Counter(s).values(), default=0)\n```"
    banned = "```python\nimport os\ndef f(s):\n    return math.isqrt(len(s)) + max(Counter(s).values(), default=0)\n```"
    got = azr.grade_answers(azr_executor, [("induction", task, uses_imports), ("induction", task, banned)])
    assert got == [True, False]


def test_induction_answer_without_code_is_a_format_failure():
    no_code = " f counts letters </think> <answer>It returns the count of letters.</answer>"
    with_code = " f </think> <answer>```python\ndef f(s):\n    return len(s)\n```</answer>"
    assert azr.format_ok(no_code) and not azr.solver_format_ok("induction", no_code)
    assert azr.solver_reward(azr.solver_format_ok("induction", no_code), False) == -1.0  # upstream: -1, not -0.5
    assert azr.solver_format_ok("induction", with_code) and azr.solver_format_ok("deduction", no_code)


def test_unterminated_answer_counts_for_learnability_not_for_the_solver_reward(azr_executor):
    task = dict(program="def f(x):\n    return x + 1", input="2", output="3")
    unterminated = " 2 + 1 </think> <answer>```output\n3\n```"
    assert azr.grade_answers(azr_executor, [("deduction", task, azr.extract_answer(unterminated))]) == [True]
    assert azr.solver_reward(azr.solver_format_ok("deduction", unterminated), True) == -1.0


def test_policy_sample_stops_at_answer_only_after_think(monkeypatch):
    """The trainer's sampler call: </answer> ends a response only after </think> (the sampler's stop_after, tested
    on generated text in the model tests), plus the stop ids; the real generate runs underneath."""
    model, tok = M.load_model("tiny")
    policy = azr.Policy(model, tok, _azr_cfg(max_response_tokens=8), (0, 1))
    calls, real = [], policy.sampler.generate
    monkeypatch.setattr(policy.sampler, "generate", lambda prompts, **kw: calls.append(kw) or real(prompts, **kw))
    out = policy.sample([tok.encode("Assistant: <think>")], n=2, seed=0)
    assert len(out) == 2 and calls[0]["stop_strings"] == ["</answer>"] and calls[0]["stop_after"] == "</think>"
    assert calls[0]["stop_token_ids"] == policy.stop_ids == [tok.eos_token_id]


def test_stop_ids_include_the_config_eos_list():
    tok = M.byte_tokenizer()
    config = M.tiny_config()
    config.eos_token_id = [128001, 128008, 128009]  # Llama-3 instruct: turns end with <|eot_id|>
    assert azr.stop_token_ids(tok, config) == [tok.eos_token_id, 128001, 128008, 128009]
    config.eos_token_id = 7
    assert azr.stop_token_ids(tok, config) == [7, tok.eos_token_id]


def test_policy_update_reports_clip_fraction_and_log_ratio():
    """Against an independent full forward: with log pi_old shifted by known offsets, the clip fraction is the
    share of tokens whose ratio leaves [1 - 0.2, 1 + 0.2], and the |log ratio| statistics are those offsets."""
    model, tok = M.load_model("tiny", seed=5)
    policy = azr.TokenLogprobs(model, len(tok))
    cfg = _azr_cfg(lr=1e-5, micro_batch_tokens=64)
    prompt = tok.encode("q:")
    samples = M.generate(model, [prompt], n=3, max_new_tokens=9, tokenizer=tok, seed=1)
    offsets = [0.5, 0.0, -0.5, 0.1]  # ratios e^-0.5 (clipped), 1, e^0.5 (clipped), e^-0.1 (kept)
    rollouts, shifts = [], []
    for s in samples:
        with torch.no_grad():
            logits = _model_logits(model, torch.tensor([prompt + s.tokens]))[0, len(prompt) - 1:-1].double()
        logits[:, len(tok):] = -float("inf")
        exact = logits.log_softmax(-1)[torch.arange(len(s.tokens)), torch.tensor(s.tokens)]
        shift = [offsets[t % 4] for t in range(len(s.tokens))]
        rollouts.append(azr.Rollout("solve_x", prompt, s.tokens, (exact + torch.tensor(shift)).tolist(), advantage=1.0))
        shifts += shift
    stats = azr.policy_update(policy, torch.optim.AdamW(policy.parameters(), lr=cfg.lr), rollouts, cfg)
    clipped = [abs(math.exp(-d) - 1) > cfg.clip_ratio for d in shifts]
    assert stats["clip_fraction"] == pytest.approx(statistics.fmean(clipped), abs=1e-9)
    assert stats["abs_log_ratio"] == pytest.approx(statistics.fmean(map(abs, shifts)), abs=1e-4)
    assert stats["max_abs_log_ratio"] == pytest.approx(0.5, abs=1e-4)
    assert all(p.grad is None for p in policy.parameters())  # freed before the next rollouts


class _ScriptedPolicy(azr.Policy):
    """Drives azr_step with scripted model text (orchestration only; the real sampler runs in the training
    tests): proposals are chosen by the proposer prompt's kind, answers by a marker comment in the task program."""

    def __init__(self, cfg, script):
        model, tok = M.load_model("tiny")
        super().__init__(model, tok, cfg, (0, 1))
        self.script = script

    def sample(self, prompts, n, seed, max_new_tokens=None, temperature=None, progress=None):
        out = []
        for ids in prompts:
            for j in range(n):
                text = self.script(self.tokenizer.decode(ids), j)
                tokens = self.tokenizer.encode(text)[:self.cfg.max_response_tokens]
                reason = "length" if len(tokens) == self.cfg.max_response_tokens else "stop"
                out.append((M.Sample(tokens, [-1.0] * len(tokens), reason), self.tokenizer.decode(tokens)))
        return out


def _azr_answer(block, text):
    return f" thinking </think> <answer>```{block}\n{text}\n```</answer>"


def test_azr_step_rewards_drops_and_truncation_with_scripted_text(azr_executor):
    """One Algorithm-1 step on scripted text through the real parsing, executor, grading and rewards: Eq. 4-6 per
    proposal, dropped prompts and length-limited responses counted, a solver batch kept full."""
    long_comment = "# " + "padding " * 340  # its solver prompt exceeds 2,500 tokens
    proposals = {  # the deduction proposer's 4 responses, in prompt order
        0: " t </think> <answer>```python\ndef f(x):\n    # easy\n    return x * 3\n```\n```input\n4\n```</answer>",
        1: " t </think> <answer>```python\ndef f(x):\n    # half\n    return x - 1\n```\n```input\n9\n```</answer>",
        2: " t </think> <answer>```python\ndef f(x):\n    return 1 / x\n```\n```input\n0\n```</answer>",  # raises
        3: f" no think end <answer>```python\ndef f(x):\n    {long_comment}\n    return x\n```\n```input\n5\n```</answer>",
    }
    proposer_calls = []

    def script(prompt, j):
        if "invent a Python program" in prompt:
            proposer_calls.append(prompt)
            return proposals[(len(proposer_calls) - 1) % 4]
        if "# easy" in prompt:
            return _azr_answer("output", "12")
        if "# half" in prompt:  # learnability samples alternate right and wrong: solve rate 1/2
            return _azr_answer("output", "8" if j % 2 == 0 else "7")
        return " I keep thinking and never stop " * 100

    cfg = _azr_cfg(tasks="deduction", batch_size=4, n_learnability=4, k_references=0, max_prompt_tokens=2500,
                   max_response_tokens=3000)
    policy = _ScriptedPolicy(cfg, script)
    buffers = azr.new_buffers(cfg)
    for k in range(3):
        buffers["deduction"].add(dict(program=f"def f(a):\n    return a + {k}", input="1", output=str(1 + k)))
    logged = []
    metrics = azr.azr_step(1, policy, torch.optim.AdamW(policy.trainable.parameters(), lr=1e-6), azr_executor,
                           buffers, cfg, random.Random(0), log=lambda step, rollouts: logged.extend(rollouts))
    proposer = [r for r in logged if r.key == "propose_deduction"]
    solver = [r for r in logged if r.key == "solve_deduction"]
    # Eq. 4: "easy" solved by all 4 samples -> trivial (0); "half" by 2 of 4 -> 1 - 1/2. Eq. 6: raises -> -1;
    # unformatted -> -1 although valid (it still enters the buffer, as upstream)
    assert [r.reward for r in proposer] == [0.0, 0.5, -1.0, -1.0]
    assert metrics["valid_rate/deduction"] == 0.75 and metrics["learnability_solve_rate/deduction"] == 0.75
    assert any("padding" in t["program"] for t in buffers["deduction"].items)
    # the unformatted proposal gets no learnability rollouts; the long one's solver prompt (> 2,500 tokens)
    # is dropped from the solver batch and replaced from the buffer: the batch stays full
    assert metrics["dropped/solver_prompt/deduction"] >= 1 and len(solver) == cfg.batch_size
    assert all(len(r.prompt) <= cfg.max_prompt_tokens for r in solver)
    assert metrics["dropped/learnability_prompt/deduction"] == 0 and metrics["dropped/proposer_prompt/deduction"] == 0
    # solver: "easy" correct 1, "half" answered 8 = 9 - 1 correct 1, buffer tasks get endless text, cut
    cut = [len(r.tokens) == cfg.max_response_tokens and r.tokens[-1] not in policy.stop_ids for r in solver]
    assert metrics["truncated/solve_deduction"] == statistics.fmean(cut) > 0
    assert all(r.reward == (-1.0 if c else 1.0) for r, c in zip(solver, cut))
    assert metrics["truncated/propose_deduction"] == 0.0


def test_too_long_learnability_prompt_is_counted(azr_executor):
    cfg = _azr_cfg(tasks="deduction", batch_size=2, n_learnability=2, k_references=0, max_prompt_tokens=2000,
                   max_response_tokens=2000)
    big = "# " + "x" * 1500  # the proposer prompt fits 2,000 tokens, the program's solver prompt does not
    text = f" t </think> <answer>```python\ndef f(x):\n    {big}\n    return x\n```\n```input\n1\n```</answer>"
    policy = _ScriptedPolicy(cfg, lambda prompt, j: text if "invent a Python program" in prompt else " </think>")
    buffers = azr.new_buffers(cfg)
    metrics = azr.azr_step(1, policy, torch.optim.AdamW(policy.trainable.parameters(), lr=1e-6), azr_executor,
                           buffers, cfg, random.Random(0))
    assert metrics["valid_rate/deduction"] == 1.0
    assert metrics["dropped/learnability_prompt/deduction"] == 2  # both proposals: trivial reward, counted
    assert metrics["reward/propose_deduction"] == cfg.trivial_proposal_reward


def test_task_buffer_fifo_and_dedup():
    buf = azr.TaskBuffer(cap=3)
    tasks = [dict(program=f"def f(a):\n    return a + {i}", input="1", output=str(1 + i)) for i in range(5)]
    assert buf.add(tasks[0]) and not buf.add(dict(tasks[0]))
    for t in tasks[1:]:
        buf.add(t)
    assert list(buf.items) == tasks[2:]           # oldest dropped first
    assert buf.add(dict(tasks[0]))                 # evicted entries may come back
    assert sorted(map(str, buf.sample(random.Random(0), 10))) == sorted(map(str, buf.items))
    filled = buf.fill(random.Random(0), 10)  # a short buffer still fills a whole solver batch
    assert len(filled) == 10 and all(t in buf.items for t in filled)
    assert sorted(map(str, buf.fill(random.Random(0), 3))) == sorted(map(str, buf.items))


def test_seed_file_loads_real_seeds_with_recomputed_outputs(azr_executor):
    cfg = _azr_cfg()
    buffers = azr.new_buffers(cfg)
    azr.load_seed_file(shared_data("3b_coder_seed_io.jsonl"), azr_executor, cfg, buffers)
    rows = [json.loads(line) for line in shared_data("3b_coder_seed_io.jsonl").read_text().splitlines()]
    assert len(buffers["deduction"]) > 200 and len(buffers["induction"]) > 200
    stored = {}
    for r in rows:
        try:
            stored[azr.check_program(r["snippet"])] = r["output"]
        except azr.Invalid:  # upstream allowed `import os`/`sys`; our rule 2 does not (SPEC [differs])
            pass
    comparable = [(azr.safe_value(stored[t["program"]]), t["output"]) for t in buffers["deduction"].items
                  if t["program"] in stored]
    agree = [ok and values_equal(v, parse_value(out)) for (ok, v), out in comparable]
    assert len(agree) > 200 and sum(agree) >= 0.95 * len(agree)  # the rest: truncated or non-repr upstream outputs


# --- end to end: training run, resume, eval, plot --------------------------------------------------------------

_AZR_SMALL = ["--model", "tiny", "--device", "cpu", "--batch-size", "2", "--n-learnability", "2",
              "--k-references", "2", "--max-response-tokens", "24", "--max-prompt-tokens", "4096",
              "--exec-workers", "2", "--exec-timeout", "5", "--lr", "1e-3", "--seed-file",
              str(SEED_SAMPLE), "--save-every", "2"]


def _azr_run(args, cwd, stderr=False):
    out = subprocess.run([sys.executable, str(REPO / "azr.py"), *args], cwd=cwd, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return (out.stdout, out.stderr) if stderr else out.stdout


def _azr_rows(run):
    """Metrics that a resumed run must reproduce exactly; the sampler-vs-trainer log-ratio figures are rounding
    noise (~1e-7 here) that moves with the sampler's block layout, so they are compared to 5 decimals."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: round(v, 5) if k.endswith("abs_log_ratio") else v for k, v in r.items()
             if not k.startswith(("time/", "tokens_per_s", "mfu"))} for r in rows]


def test_train_tiny_two_steps_then_resume_matches_straight_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    stdout = _azr_run([*_AZR_SMALL, "--steps", "2", "--out-dir", str(resumed)], tmp_path)
    for key in ("propose_deduction", "propose_abduction", "propose_induction", "solve_deduction",
                "solve_abduction", "solve_induction"):
        assert key in stdout
    ckpt = resumed / "checkpoints" / "step_000002"
    assert all((ckpt / f).is_file() for f in ("model/config.json", "optimizer.pt", "state.json", "buffers.json"))
    assert (resumed / "samples.txt").read_text().count("=== step 2") >= 6
    _azr_run([*_AZR_SMALL, "--steps", "3", "--out-dir", str(resumed), "--resume", "auto"], tmp_path)
    _azr_run([*_AZR_SMALL, "--steps", "3", "--out-dir", str(straight), "--save-every", "1", "--keep-checkpoints", "2"],
             tmp_path)
    assert sorted(p.name for p in (straight / "checkpoints").glob("step_*")) == ["step_000002", "step_000003"]
    assert _azr_rows(resumed) == _azr_rows(straight) and len(_azr_rows(straight)) == 3
    a, b = (json.loads((r / "checkpoints" / "step_000003" / "buffers.json").read_text()) for r in (resumed, straight))
    assert a == b
    from safetensors.torch import load_file
    wa, wb = (load_file(next((r / "checkpoints" / "step_000003" / "model").glob("*.safetensors")))
              for r in (resumed, straight))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _azr_fails_in_one_line(args, needle, cwd):
    out = subprocess.run([sys.executable, str(REPO / "azr.py"), *args], cwd=cwd, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert needle in last, out.stderr[-2000:]
    return last


def test_bad_flags_give_one_line_errors(tmp_path):
    """What a new user tries: each ends in one line that names the flag (or file and line), before any work."""
    not_jsonl = tmp_path / "not.jsonl"
    not_jsonl.write_text("code,input,output\nprint(1),1,1\n")
    bad_seed = tmp_path / "bad_seed_io.jsonl"
    bad_seed.write_text(SEED_SAMPLE.read_text().splitlines()[0] + "\n" + '{"snippet": "def f(a):\\n    return a"}\n')
    train = ["--model", "tiny", "--out-dir", str(tmp_path / "r")]
    cases = [(["--tasks", "deduction,bogus"], "--tasks"), (["--resume", str(tmp_path)], "--resume"),
             (["--seed-file", str(tmp_path / "nope.jsonl")], "--seed-file"), (["--batch-size", "0"], "--batch-size"),
             (["--temperature", "-1"], "--temperature"), (["--max-response-tokens", "0"], "--max-response-tokens"),
             (["--top-p", "1.5"], "--top-p"), (["--exec-timeout", "0"], "--exec-timeout"),
             (["--seed-file", str(bad_seed)], f"{bad_seed} line 2 lacks 'input'")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda"))
    for args, needle in cases:
        _azr_fails_in_one_line([*train, "--device", "cpu", *args] if "--device" not in args else [*train, *args],
                               needle, tmp_path)
    assert "line 1 is not JSON" in _azr_fails_in_one_line(
        ["eval", "--model", "tiny", "--device", "cpu", "--data", str(not_jsonl)], str(not_jsonl), tmp_path)
    _azr_fails_in_one_line(["eval", "--model", "tiny", "--device", "cpu", "--data", str(not_jsonl), "--limit", "-1"],
                           "--limit", tmp_path)


def test_cruxeval_gold_answers_grade_correct(azr_executor):
    """Grading agrees with CRUXEval: the gold output is a correct deduction answer and the gold input a correct
    abduction answer for every item."""
    rows = [json.loads(line) for line in shared_data("cruxeval.jsonl").read_text().splitlines()]
    items = [(kind, dict(program=r["code"], input=r["input"], output=r["output"]),
              f"```{'output' if kind == 'deduction' else 'input'}\n{r['output' if kind == 'deduction' else 'input']}\n```")
             for kind in ("deduction", "abduction") for r in rows]
    cfg = azr.Config()  # the executor settings `azr.py eval` uses
    with Executor(workers=2, timeout=cfg.exec_timeout, max_output_chars=cfg.max_output_chars) as ex:
        verdicts = azr.grade_answers(ex, items)
    failed = [(k, t["input"]) for (k, t, _), v in zip(items, verdicts) if not v]
    # The only exceptions: abduction items whose gold input is code, not a value (`range(100, 120)`, a lambda,
    # `'$78'.upper()`): SPEC rule 3 refuses such inputs from any solver, so they cannot count as correct.
    exceptions = [(k, t["input"]) for k, t, _ in items if k == "abduction" and not _azr_parses_as_args(t["input"])]
    assert failed == exceptions and len(exceptions) <= 10


def _azr_parses_as_args(text):
    try:
        parse_args(text)
        return True
    except ValueError:
        return False


def test_eval_command_and_plot_on_tiny(tmp_path):
    stdout, stderr = _azr_run(["eval", "--model", "tiny", "--data", str(shared_data("cruxeval.jsonl")), "--limit", "3",
                               "--max-new-tokens", "8", "--device", "cpu", "--dtype", "bf16", "--exec-workers", "2",
                               "--out", str(tmp_path / "answers.jsonl")], tmp_path, stderr=True)
    scores = re.search(r"CRUXEval-O pass@1 ([\d.]+) \((\d)/3\)  CRUXEval-I pass@1 ([\d.]+) \((\d)/3\)", stdout)
    assert scores and all(float(scores[k]) == int(scores[k + 1]) / 3 for k in (1, 3)), stdout
    assert "generate: 100%" in stderr and "6/6" in stderr  # a progress bar even for 6 prompts
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert sorted(r["task"] for r in rows) == ["CRUXEval-I"] * 3 + ["CRUXEval-O"] * 3
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward/solve_deduction": -1.0 + s / 4,
                                                           "valid_rate/deduction": s / 8}) + "\n" for s in (1, 2)))
    out = Path(azr.plot_main([str(run)]))
    assert out.is_file() and out.stat().st_size > 0


# --- opt-in: real weights (AZR_TEST_MODEL=<local HF dir>; `bash ../shared/tools/real-model.sh` builds one) ------

REAL_MODEL = os.environ.get("AZR_TEST_MODEL", "")
real_weights = pytest.mark.skipif(not REAL_MODEL, reason="real-weight test: set AZR_TEST_MODEL to a local Hugging Face "
                                                         "directory (bash ../shared/tools/real-model.sh builds one)")


@pytest.fixture(scope="module")
def real_model():
    return M.load_model(REAL_MODEL)


@real_weights
def test_real_weights_logits_match_transformers(real_model):
    from transformers import AutoModelForCausalLM
    ours, tok = real_model
    hf = AutoModelForCausalLM.from_pretrained(REAL_MODEL, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(azr.R1_TEMPLATE.format("What does f(3) return?"))])
    with torch.no_grad():
        assert _model_rel_err(_model_logits(ours, ids), hf(ids).logits) < 1e-4


@real_weights
def test_real_weights_sampler_logprobs_match_full_forward(real_model):
    model, tok = real_model
    prompt = tok.encode(azr.R1_TEMPLATE.format("Write a Python function that reverses a list."))
    for s in M.generate(model, [prompt], n=2, max_new_tokens=24, temperature=1.0, tokenizer=tok, seed=3):
        with torch.no_grad():
            logits = _model_logits(model, torch.tensor([prompt + s.tokens]))[0, len(prompt) - 1:-1].double()
        logits[:, len(tok):] = -float("inf")
        ref = logits.log_softmax(-1)[torch.arange(len(s.tokens)), torch.tensor(s.tokens)]
        torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.double), ref, rtol=0, atol=2e-3)


@real_weights
def test_real_weights_cruxeval_answers_are_formatted_and_parse(tmp_path):
    """The model is weak (about a third of its CRUXEval answers are unformatted, many without fences): require
    some well-formatted answers whose value parses as grading reads it (the last fenced block, else the answer)."""
    out = tmp_path / "answers.jsonl"
    _azr_run(["eval", "--model", REAL_MODEL, "--data", str(shared_data("cruxeval.jsonl")), "--limit", "4",
              "--max-new-tokens", "384", "--device", "cpu", "--exec-workers", "2", "--out", str(out)], tmp_path)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    usable = []
    for r in rows:
        block = "output" if r["task"] == "CRUXEval-O" else "input"
        if not azr.format_ok(r["response"]):
            usable.append(False)
            continue
        text = (azr.fenced_blocks(r["answer"], block) or [r["answer"]])[-1].strip()
        usable.append(azr.safe_value(text)[0] if block == "output" else _azr_parses_as_args(text))
    assert len(rows) == 8 and any(usable), rows


@real_weights
def test_real_weights_one_self_play_step_gives_only_allowed_rewards(real_model, azr_executor):
    model, tok = real_model
    cfg = _azr_cfg(model=REAL_MODEL, batch_size=2, n_learnability=2, k_references=2, max_response_tokens=256,
                   seed_file=str(SEED_SAMPLE), micro_batch_tokens=4096)
    for block in model.layers:  # as train() does: ~12 GB in all for 0.5B in fp32 with AdamW, not ~40
        block.checkpointing = True
    policy = azr.Policy(model, tok, cfg, (0, 1))
    buffers = azr.init_buffers(policy, azr_executor, cfg, random.Random(0), (0, 1))
    logged = []
    metrics = azr.azr_step(1, policy, torch.optim.AdamW(model.parameters(), lr=cfg.lr), azr_executor, buffers, cfg,
                           random.Random(0), log=lambda step, rollouts: logged.extend(rollouts))
    N = cfg.n_learnability
    proposer_values = {-1.0, cfg.trivial_proposal_reward} | {1 - k / N for k in range(1, N)}
    assert len(logged) == 6 * cfg.batch_size
    for r in logged:
        assert r.reward in (proposer_values if r.key.startswith("propose_") else {1.0, -0.5, -1.0}), (r.key, r.reward)
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])


# --- the loss really learns, and FSDP2 on two ranks equals one process ----------------------------------------

def test_policy_update_raises_a_toy_verifiable_reward():
    """Reward = share of generated tokens equal to one target byte. If the advantage sign, the logprob plumbing
    or the update were wrong, the mean reward would not rise."""
    from model import generate, load_model
    torch.manual_seed(0)
    model, tok = load_model("tiny", seed=0)
    cfg = _azr_cfg(lr=3e-3, micro_batch_tokens=4096, entropy_coef=0.0)
    policy = azr.TokenLogprobs(model, len(tok))
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    target = tok("a", add_special_tokens=False)["input_ids"][0]
    prompt = tok("x", add_special_tokens=False)["input_ids"]
    history = []
    for step in range(30):
        samples = generate(model, [prompt], n=16, max_new_tokens=8, temperature=1.0, seed=step, tokenizer=tok)
        rewards = [sum(t == target for t in s.tokens) / len(s.tokens) for s in samples]
        history.append(statistics.fmean(rewards))
        rollouts = [azr.Rollout("solve_toy", prompt, s.tokens, s.logprobs, reward=r)
                    for s, r in zip(samples, rewards)]
        for r, a in zip(rollouts, azr.trr_advantages(rewards)):
            r.advantage = a
        azr.policy_update(policy, opt, rollouts, cfg)
    assert statistics.fmean(history[-5:]) > statistics.fmean(history[:5]) + 0.2, history


_AZR_FSDP_SCRIPT = r"""
import random, sys, torch
sys.path.insert(0, sys.argv[1])
import azr
from model import load_model
cfg = azr.Config(model="tiny", device="cpu", lr=1e-2, micro_batch_tokens=96)
world = azr.init_distributed(cfg)
torch.manual_seed(0)
model, tok = load_model("tiny", seed=0)
for block in model.layers:
    block.checkpointing = True
policy = azr.Policy(model, tok, cfg, world)
opt = torch.optim.AdamW(policy.trainable.parameters(), lr=cfg.lr, weight_decay=0.01)
rng = random.Random(0)
rollouts = [azr.Rollout("solve_x", [rng.randrange(200) for _ in range(rng.randrange(2, 9))],
                        [rng.randrange(200) for _ in range(rng.randrange(1, 12))], [], reward=0.0)
            for _ in range(7)]
for r in rollouts:
    r.logprobs = [-rng.random() * 5 for _ in r.tokens]
    r.advantage = rng.uniform(-2, 2)
full = lambda t: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
state = {}  # policy_update frees the gradients after the step: read them just before it
opt.register_step_pre_hook(lambda *_: state.update(
    {"grad." + k: full(p.grad) for k, p in policy.trainable.model.named_parameters()}))
azr.policy_update(policy.trainable, opt, rollouts, cfg, world)
state.update({k: full(p) for k, p in policy.trainable.model.named_parameters()})
assert all(p.grad is None for p in policy.trainable.parameters())
if world[0] == 0:
    torch.save(state, sys.argv[2])
if world[1] > 1:
    torch.distributed.barrier()  # as azr.main does: a rank that tears gloo down while rank 0 still saves can abort
    torch.distributed.destroy_process_group()
"""


def test_fsdp2_two_ranks_equal_one_process(tmp_path):
    script = tmp_path / "fsdp_step.py"
    script.write_text(_AZR_FSDP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    one = subprocess.run([sys.executable, str(script), str(REPO), str(tmp_path / "one.pt")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(REPO), str(tmp_path / "two.pt")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    before = dict(__import__("model").load_model("tiny", seed=0)[0].named_parameters())
    assert a.keys() == b.keys()
    moved = 0
    for k in before:
        torch.testing.assert_close(b["grad." + k], a["grad." + k], rtol=1e-5, atol=1e-8, msg=k)
        # Adam's first step is about lr * sign(grad): gradients at rounding-noise level (e.g. the key bias's,
        # which softmax ignores) become full-size steps of arbitrary sign, so compare where the gradient is real.
        real = a["grad." + k].abs() > 1e-6
        torch.testing.assert_close(b[k][real], a[k][real], rtol=1e-5, atol=1e-6, msg=k)
        moved += int((a[k][real] != before[k].detach()[real]).sum())
    assert moved > 1000  # the step changed the weights


def test_torchrun_two_ranks_runs_the_whole_loop(tmp_path):
    """Sampling sharded over ranks, executor work on rank 0 only, FSDP2 update: one full step on gloo."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(REPO / "azr.py"), "--model", "tiny", "--device", "cpu", "--steps", "1", "--batch-size",
                          "2", "--n-learnability", "2", "--max-response-tokens", "16", "--seed-size", "0",
                          "--exec-workers", "1", "--out-dir", str(tmp_path / "run")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and len([k for k in rows[0] if k.startswith("reward/")]) == 6
    assert (tmp_path / "run" / "checkpoints" / "step_000001" / "model" / "model.safetensors").is_file()


# ==============================================================================================================
# bench.py gpu: the one prepared GPU command, end to end on the CPU (issue 11)
# ==============================================================================================================

def test_bench_gpu_cpu_dry_run_gives_a_verdict_for_every_path(tmp_path):
    import bench
    out = subprocess.run([sys.executable, str(REPO / "bench.py"), "gpu", "--cpu-dry-run", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    verdicts = [line.split(" ", 3) for line in out.stdout.splitlines() if line.startswith("VERDICT ")]
    assert {v[1].split(".")[0] for v in verdicts} == set(bench.GPU_CHECKS), out.stdout  # e.g. step.tiny
    assert all(v[2] == "pass" for v in verdicts), out.stdout
    assert (tmp_path / "verdicts.txt").read_text().splitlines() == [" ".join(v) for v in verdicts]
    assert all((tmp_path / f"{name}.log").is_file() for name in bench.GPU_CHECKS)
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert figures.keys() == set(bench.GPU_CHECKS)
