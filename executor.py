"""A fork-server sandbox for model-written Python, and the value semantics every AZR reward uses.

SPEC sections 3-4. The trainer never runs model code and never forks itself (it holds CUDA/NCCL threads).
It spawns `workers` clean, single-threaded *zygote* interpreters (`python -s -S -P`, scrubbed environment,
fixed PYTHONHASHSEED, common stdlib modules pre-imported, `gc.freeze()`d). Each task runs in a fresh fork
of a zygote and sends back one length-prefixed JSON frame {status, value, error}, which the zygote passes
on unread. Nothing that comes back is ever pickled or evaluated: the trainer checks the frame's schema and
re-checks `value` with `parse_value`, the AST whitelist below.

    with Executor(workers=2) as ex:
        ex.run("def f(a):\\n    return sorted(a)", "[3, 1, 2]")   # Result('ok', '[1, 2, 3]', None)

Per task, between fork and the program (child) and around it (zygote):
  - the child is forked before its job arrives and does all of this, and a fixed warm-up call, while it
    waits (a task then pays for its pipe hops and the program, not for fork and setup);
  - own session and process group; parent-death SIGKILL; every inherited fd closed but the job pipe (closed
    once read) and the result pipe; stdin, stdout, stderr on /dev/null (prints are discarded, `input()`
    raises EOFError at once);
  - cwd = a fresh 0700 directory on tmpfs (/dev/shm), removed afterwards; umask 077;
  - rlimits: address space = zygote size + memory_mb, CPU = timeout + 1 s, file size 8 MiB, 64 fds,
    no core dumps, 16 processes when a uid drop is active;
  - wall-clock limit: the zygote SIGKILLs the whole process group, then sweeps (kills and reaps) every
    process re-parented to it: it is a child subreaper, so setsid/double-fork escapees land there;
  - the result frame is read as soon as it is complete, never by waiting for EOF (a grandchild holding
    the pipe cannot stall a finished task); a frame over 64 KiB or off-schema is a `crash`; the zygote
    answers first and cleans up (kill, reap, sweep, remove the dir) before it takes its next task;
  - the next task's child: forked while the task runs when the active layers keep a task from reaching
    another task's child and dir (Landlock with signal scoping, ABI >= 6, and seccomp), otherwise only
    after the cleanup; one unused for 50 ms is retired, so an idle executor holds no child and no task dir.
Defence layers, each detected when a zygote starts, checked by a probe fork, logged, and skipped with the
reason when the kernel or the machine refuses it (the executor is still correct with none of them). The
first zygote fixes the set: a later one (restart, other worker, determinism) that cannot enable all of
them refuses to start, and its tasks are `internal`, rather than run with fewer.
  - netns:    the zygote unshares a network namespace (userns + netns when not root): no usable network;
              and an IPC namespace where allowed, so task-made SysV IPC never reaches the host's;
  - uid:      when root, children drop to a per-zygote uid (61000 + 2 * worker + probe) with no groups;
              refused where the stdlib is not readable by that uid (e.g. a pyenv under a 0700 /root);
  - nocaps:   when root and still uid 0, children drop every capability;
  - landlock: writes only inside the task dir; reads only the stdlib, /usr, /lib, /lib64 (not /proc,
              /etc, /home, /root, the project); TCP bind/connect denied (ABI >= 4); signals and abstract
              unix sockets scoped to the task (ABI >= 6), which also blocks ptrace and /proc/<pid>/mem;
  - seccomp:  a hand-written BPF filter (x86-64 only): socket, exec, fork/vfork/clone without
              CLONE_THREAD, ptrace, kill and friends, SIGIO ownership (fcntl F_SETOWN/F_SETSIG/
              F_SETOWN_EX, ioctl FIOSETOWN/SIOCSPGRP), priority/affinity/scheduler changes to any
              process but the caller, setsid/setpgid, setrlimit, mount/unshare/setns, bpf, io_uring,
              keyctl, SysV IPC and POSIX message queues, uid changes, module and reboot calls fail with
              EPERM (clone3 ENOSYS so glibc falls back to clone and threads still work).
What is NOT protected: kernel exploits (run the whole trainer in a VM/container for hostile code);
aggregate RAM across tasks and tmpfs files (no cgroups: K workers x memory_mb, plus files in task dirs,
bounded only by the per-file size cap, and all task dirs share /dev/shm, which a task can fill until the
cleanup after it); CPU contention between tasks; reads of world-readable files under /usr and the
stdlib; a program forging its own result frame (it can only claim a value for f, which it controls
anyway; the frame is schema- and value-checked); without Landlock and the uid drop, the executor's own
files and signals; without seccomp, renicing or pinning other same-uid processes, and SysV IPC shared by
the tasks of one zygote (a channel to the next task; without netns too, RAM that outlives the task);
without netns/seccomp/landlock, the network; without seccomp (which denies socket()), pathname UNIX
sockets of other same-uid processes (netns and Landlock do not govern connect() to them); escapees
outliving a zygote that is itself killed. A program that sets up its own process group cannot hide from the subreaper sweep.

Determinism (SPEC rule 5): `check_determinism=True` re-runs every job that succeeded in a second zygote per
worker, started lazily with another PYTHONHASHSEED (and so another heap layout and `random` state). The job
is `error: Nondeterministic` unless the second run is also `ok` and its value equals the first by
`values_equal` (values, not reprs: a set returned in another order is the same set). A second run that
fails for any reason but `internal` also counts as nondeterministic.
"""
import ast
import ctypes
import json
import math
import os
import resource
import select
import shutil
import signal
import struct
import sys
import time
import types
from typing import NamedTuple

if __name__ != "__main__":  # the trainer side. A zygote runs this file as a script and must not load these:
    import logging           # threading (which they all import) registers an at-fork handler that costs
    import queue             # every forked task ~80 page copies, about half a millisecond of CPU here.
    import subprocess
    import tempfile
    import threading

    log = logging.getLogger("azr.executor")

STATUSES = ("ok", "error", "timeout", "memory", "output_limit", "crash", "internal")


class Result(NamedTuple):
    status: str          # one of STATUSES; only 'ok' ever counts as success
    value: str | None    # repr(f(*args, **kwargs)) when ok
    error: str | None    # "ExcType: message" when not ok


# ---------------------------------------------------------------------------------------------------------
# Value semantics (SPEC rule 3 and section 4). Runs in the trainer: no eval, bounded work and memory.

_MAX_TEXT = 100_000        # characters of value text
_MAX_DEPTH = 100           # nesting of the expression tree
_MAX_INT_BITS = 1 << 14    # ~4,900 decimal digits: above CPython's 4,300-digit repr limit
_MAX_CELLS = 1_000_000     # logical elements + characters of all values built, together (see _SafeValue)
_CALLS = {"set": set, "frozenset": frozenset, "dict": dict, "list": list, "tuple": tuple}
_UNARY = {ast.USub: lambda a: -a, ast.UAdd: lambda a: +a, ast.Invert: lambda a: ~a}
_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
           ast.Pow: lambda a, b: a ** b, ast.LShift: lambda a, b: a << b, ast.RShift: lambda a, b: a >> b,
           ast.BitOr: lambda a, b: a | b, ast.BitXor: lambda a, b: a ^ b, ast.BitAnd: lambda a, b: a & b}
_CONSTANTS = (int, float, complex, str, bytes, bool, type(None))
_SEQUENCES = (str, bytes, list, tuple)


class _SafeValue:
    """Evaluates a whitelisted expression tree; every refusal is a ValueError with a one-line reason.

    Sizes are logical: `[[0] * 1000] * 1000` holds a million cells although repetition only copies
    references, and walking it (values_equal, hashing) takes a million steps. Every built value is charged
    its logical size, so all the work parsing and comparing does stays bounded by _MAX_CELLS."""

    def __init__(self):
        self.cells = 0
        self.weights = {}  # id -> (container, logical size); holding the container keeps its id unique

    def weight(self, v) -> int:
        """Logical size: characters of a str or bytes; a container's length plus its children's weights."""
        if isinstance(v, (str, bytes)):
            return len(v)
        if not isinstance(v, (list, tuple, set, frozenset, dict)):
            return 0
        if id(v) not in self.weights:
            children = [x for item in v.items() for x in item] if isinstance(v, dict) else v
            self.weights[id(v)] = (v, len(v) + sum(map(self.weight, children)))
        return self.weights[id(v)][1]

    def sized(self, v):
        if isinstance(v, int) and v.bit_length() > _MAX_INT_BITS:
            raise ValueError(f"integer over {_MAX_INT_BITS} bits")
        self.cells += self.weight(v)
        if self.cells > _MAX_CELLS:
            raise ValueError(f"value holds over {_MAX_CELLS} elements")
        return v

    def eval(self, node, depth=0):
        if depth > _MAX_DEPTH:
            raise ValueError(f"value nested deeper than {_MAX_DEPTH}")
        ev = lambda n: self.eval(n, depth + 1)  # noqa: E731
        if isinstance(node, ast.Constant) and type(node.value) in _CONSTANTS:
            return self.sized(node.value)
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items = [ev(e) for e in node.elts]  # a Starred element is not whitelisted and fails in ev
            kind = {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)]
            return self.sized(self.build(kind, items))
        if isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):
                raise ValueError("'**' unpacking is not a value")
            return self.sized(self.build(dict, list(zip(map(ev, node.keys), map(ev, node.values)))))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return self.sized(self.apply(_UNARY[type(node.op)], ev(node.operand)))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            a, b = ev(node.left), ev(node.right)
            self.check_cost(node.op, a, b)
            return self.sized(self.apply(_BINARY[type(node.op)], a, b))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALLS:
            name = node.func.id
            if len(node.args) > 1 or any(isinstance(a, ast.Starred) for a in node.args):
                raise ValueError(f"{name}() takes at most one plain argument here")
            if node.keywords and (name != "dict" or any(k.arg is None for k in node.keywords)):
                raise ValueError(f"{name}() takes no keyword arguments here")
            args = [ev(a) for a in node.args]
            kwargs = {k.arg: ev(k.value) for k in node.keywords}
            return self.sized(self.apply(_CALLS[name], *args, **kwargs))
        what = type(node).__name__ + (f" '{node.id}'" if isinstance(node, ast.Name) else "")
        raise ValueError(f"{what} is not allowed in a value (only literals, containers, arithmetic, "
                         f"and set/frozenset/dict/list/tuple calls)")

    def check_cost(self, op, a, b):
        """Refuse before computing what would be huge: `10**10**9`, `1 << 10**9`, `[[0] * 10**4] * 10**4`."""
        ints = isinstance(a, int) and isinstance(b, int)
        if isinstance(op, ast.Pow) and ints and b > 0 and abs(a) > 1 and (abs(a).bit_length() - 1) * b > _MAX_INT_BITS:
            raise ValueError(f"power result over {_MAX_INT_BITS} bits")
        if isinstance(op, ast.LShift) and ints and b > 0 and a and a.bit_length() + b > _MAX_INT_BITS:
            raise ValueError(f"shift result over {_MAX_INT_BITS} bits")
        if isinstance(op, ast.Mult):
            seq, n = (a, b) if isinstance(a, _SEQUENCES) else (b, a)
            if isinstance(seq, _SEQUENCES) and isinstance(n, int) and self.weight(seq) * n > _MAX_CELLS:
                raise ValueError(f"repetition over {_MAX_CELLS} elements")
        if isinstance(op, ast.Mod) and isinstance(a, (str, bytes)):
            raise ValueError("'%' formatting is not a value")

    @staticmethod
    def apply(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (TypeError, ValueError, ArithmeticError) as e:
            raise ValueError(f"{type(e).__name__}: {e}") from None

    build = apply


def _parse(text: str, what: str) -> ast.AST:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be str, got {type(text).__name__}")
    if len(text) > _MAX_TEXT:
        raise ValueError(f"{what} has {len(text)} characters, over the {_MAX_TEXT} cap")
    source = text.strip() if what == "value" else f"f({text}\n)"
    try:
        return ast.parse(source, mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        msg = getattr(e, "msg", None) or type(e).__name__
        raise ValueError(f"{what} is not a Python expression: {msg.splitlines()[0]}") from None


def parse_value(text: str) -> object:
    """SPEC rule 3: text of a safe value expression -> the value. ValueError (one line) otherwise."""
    return _SafeValue().eval(_parse(text, "value"))


def parse_args(text: str) -> tuple[tuple, dict]:
    """SPEC rule 3: argument-list text `1, [2], k=3` -> ((1, [2]), {'k': 3}). ValueError if unsafe."""
    call = _parse(text, "input")
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "f"):
        raise ValueError("input is not one argument list")
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        raise ValueError("'*' and '**' unpacking are not allowed in an input")
    names = [k.arg for k in call.keywords]
    if len(set(names)) != len(names):
        raise ValueError("input repeats a keyword argument")
    sv = _SafeValue()
    return tuple(sv.eval(a, 1) for a in call.args), {k.arg: sv.eval(k.value, 1) for k in call.keywords}


def _canon(v):
    """Hashable, type-tagged form of a value; never calls user code (exact type checks only)."""
    t = type(v)
    if t is float:
        return (float, "nan") if v != v else (float, v)
    if t is complex:
        return (complex, _canon(v.real), _canon(v.imag))
    if t in (int, bool, str, bytes, type(None)):
        return (t, v)
    if t in (list, tuple):
        return (t, tuple(map(_canon, v)))
    if t in (set, frozenset):
        return (t, frozenset(map(_canon, v)))
    if t is dict:
        return (t, frozenset((_canon(k), _canon(x)) for k, x in dict.items(v)))
    return (object, id(v))  # anything else equals only itself


def values_equal(a, b) -> bool:
    """SPEC section 4 type-aware structural equality: True != 1, 1 != 1.0, (1,) != [1], sets and dicts
    compare without order, floats compare exactly with ==, so 0.0 == -0.0; nan equals nan (reflexive, so
    this is an equivalence relation). Objects of other types equal only themselves."""
    try:
        return _canon(a) == _canon(b)
    except RecursionError:
        return False


# ---------------------------------------------------------------------------------------------------------
# Kernel interfaces through ctypes (Linux). Numbers are x86-64 where they differ by architecture.

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 22, 36, 38
CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWIPC, CLONE_THREAD = 0x10000000, 0x40000000, 0x08000000, 0x00010000
SYS_landlock_create_ruleset, SYS_landlock_add_rule, SYS_landlock_restrict_self = 444, 445, 446


def _check(ret, what):
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _prctl(option, arg2=0):
    _check(_libc.prctl(option, ctypes.c_ulong(arg2), 0, 0, 0), f"prctl({option})")


def _drop_capabilities():
    header = struct.pack("<Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    _check(_libc.capset(header, bytes(24)), "capset")


def _landlock_abi() -> int:
    return _libc.syscall(SYS_landlock_create_ruleset, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION


def _landlock(abi: int, task_dir: str, read_dirs: list[str]):
    """Read-only on `read_dirs`, everything inside `task_dir`, nothing else; TCP and signals scoped."""
    fs_all = (1 << 13) - 1 | (abi >= 2) << 13 | (abi >= 3) << 14 | (abi >= 5) << 15
    net = 0b11 if abi >= 4 else 0          # BIND_TCP | CONNECT_TCP with no rule: all TCP denied
    scoped = 0b11 if abi >= 6 else 0       # ABSTRACT_UNIX_SOCKET | SIGNAL
    attr = struct.pack("<QQQ", fs_all, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = _check(_libc.syscall(SYS_landlock_create_ruleset, attr, len(attr), 0), "landlock_create_ruleset")
    read = 1 | 1 << 2 | 1 << 3             # EXECUTE | READ_FILE | READ_DIR
    for path, access in [(d, read) for d in read_dirs] + [(task_dir, fs_all)]:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = struct.pack("<Qi", access, fd)  # struct landlock_path_beneath_attr is packed
        _check(_libc.syscall(SYS_landlock_add_rule, ruleset, 1, rule, 0), f"landlock_add_rule({path})")
        os.close(fd)
    _check(_libc.syscall(SYS_landlock_restrict_self, ruleset, 0), "landlock_restrict_self")
    os.close(ruleset)


# x86-64 syscall numbers denied with EPERM. SysV IPC and POSIX message queues outlive the task (RAM outside
# memory_mb, and a channel to the determinism re-run); the others reach other processes or the kernel.
_DENIED = dict(socket=41, socketpair=53, execve=59, execveat=322, fork=57, vfork=58, ptrace=101,
               process_vm_readv=310, process_vm_writev=311, kill=62, tkill=200, tgkill=234,
               rt_sigqueueinfo=129, rt_tgsigqueueinfo=297, pidfd_send_signal=424, pidfd_getfd=438,
               setsid=112, setpgid=109, setrlimit=160, mount=165, umount2=166, unshare=272, setns=308,
               chroot=161, pivot_root=155, bpf=321, io_uring_setup=425, io_uring_enter=426,
               io_uring_register=427, keyctl=250, add_key=248, request_key=249, perf_event_open=298,
               userfaultfd=323, kexec_load=246, init_module=175, finit_module=313, delete_module=176,
               reboot=169, swapon=167, swapoff=168, acct=163, settimeofday=164, name_to_handle_at=303,
               open_by_handle_at=304, mknod=133, mknodat=259, setuid=105, setgid=106, setreuid=113,
               setregid=114, setresuid=117, setresgid=119, setgroups=116, capset=126, personality=135,
               kcmp=312, process_madvise=440, syslog=103, vhangup=153, iopl=172, ioperm=173,
               fanotify_init=300, quotactl=179, move_pages=279, migrate_pages=256,
               shmget=29, shmat=30, shmctl=31, semget=64, semop=65, semctl=66, semtimedop=220,
               msgget=68, msgsnd=69, msgrcv=70, msgctl=71, mq_open=240)
_SYS_clone, _SYS_clone3, _SYS_prlimit64, _SYS_fcntl, _SYS_ioctl = 56, 435, 302, 72, 16
_SYS_setpriority, _SYS_ioprio_set = 141, 251
_SYS_sched_setparam, _SYS_sched_setscheduler, _SYS_sched_setaffinity, _SYS_sched_setattr = 142, 144, 203, 314
F_SETOWN, F_SETSIG, F_SETOWN_EX, FIOSETOWN, SIOCSPGRP = 8, 10, 15, 0x8901, 0x8902
PRIO_PROCESS, IOPRIO_WHO_PROCESS = 0, 1


def _seccomp_program() -> bytes:
    def insn(code, k, jt=0, jf=0):
        return struct.pack("<HBBI", code, jt, jf, k)
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06   # BPF_LD|W|ABS, JMP|JEQ/JGE/JSET|K, RET|K
    ALLOW, KILL, EPERM, ENOSYS = 0x7FFF0000, 0x80000000, 0x50000 | 1, 0x50000 | 38

    def arg(i, high=False):  # offset of a syscall argument's low (or high) 32 bits in struct seccomp_data
        return 16 + 8 * i + 4 * high

    def allow_only_if(checks):  # [(offset, value)]: EPERM unless every word equals its value
        body = []
        for i, (offset, value) in enumerate(checks):
            body += [insn(LD, offset), insn(JEQ, value, 0, 2 * (len(checks) - i - 1) + 1)]
        return body + [insn(RET, ALLOW), insn(RET, EPERM)]

    def deny_if(offset, values):  # EPERM when the word is one of `values`
        body = [insn(LD, offset)] + [insn(JEQ, v, len(values) - i, 0) for i, v in enumerate(values)]
        return body + [insn(RET, ALLOW), insn(RET, EPERM)]

    # Calls allowed or denied by their arguments. Each body ends in RET, so a call that is not this rule's
    # skips the body with its number still loaded. Arguments that the kernel reads as int are checked on
    # their low 32 bits, which is all the kernel uses.
    rules = {
        _SYS_clone3: [insn(RET, ENOSYS)],                                    # glibc then falls back to clone
        _SYS_clone: [insn(LD, arg(0)), insn(JSET, CLONE_THREAD, 0, 1), insn(RET, ALLOW), insn(RET, EPERM)],
        _SYS_prlimit64: allow_only_if([(arg(2), 0), (arg(2, high=True), 0)]),  # reading limits only
        # SIGIO: a file owner set to another process gets signalled when the file becomes ready
        _SYS_fcntl: deny_if(arg(1), [F_SETOWN, F_SETSIG, F_SETOWN_EX]),
        _SYS_ioctl: deny_if(arg(1), [FIOSETOWN, SIOCSPGRP]),
        # the scheduling of the caller itself only (pid 0): not the trainer's, not the next task's
        _SYS_setpriority: allow_only_if([(arg(0), PRIO_PROCESS), (arg(1), 0)]),
        _SYS_ioprio_set: allow_only_if([(arg(0), IOPRIO_WHO_PROCESS), (arg(1), 0)]),
        **{nr: allow_only_if([(arg(0), 0)]) for nr in (_SYS_sched_setparam, _SYS_sched_setscheduler,
                                                       _SYS_sched_setaffinity, _SYS_sched_setattr)},
    }
    prog = [insn(LD, 4), insn(JEQ, 0xC000003E, 1, 0), insn(RET, KILL),   # arch must be x86-64
            insn(LD, 0), insn(JGE, 0x40000000, 0, 1), insn(RET, EPERM)]  # no x32 syscalls
    for nr, body in rules.items():
        prog += [insn(JEQ, nr, 0, len(body))] + body
    for nr in _DENIED.values():
        prog += [insn(JEQ, nr, 0, 1), insn(RET, EPERM)]
    return b"".join(prog + [insn(RET, ALLOW)])


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def _seccomp(program: bytes):
    _check(_libc.prctl(PR_SET_SECCOMP, 2, ctypes.byref(_SockFprog(len(program) // 8, program)), 0, 0),
           "seccomp")


# ---------------------------------------------------------------------------------------------------------
# Framing: 4-byte big-endian length + UTF-8 JSON, both for trainer<->zygote and child->zygote.

_FRAME_CAP = 64 << 10
# Not threading: see the imports at the top.
_PREIMPORTS = ("collections", "collections.abc", "itertools", "functools", "math", "cmath", "heapq",
               "bisect", "re", "string", "typing", "dataclasses", "copy", "operator", "statistics",
               "fractions", "decimal", "json", "random", "enum", "abc", "array", "numbers", "textwrap",
               "unicodedata", "struct", "types", "contextlib", "time", "datetime")


def _frame(obj) -> bytes:
    data = json.dumps(obj, ensure_ascii=True).encode()
    return struct.pack(">I", len(data)) + data


def _write_all(fd, data: bytes):
    while data:
        data = data[os.write(fd, data):]


def _read_exact(fd, n, deadline=None) -> bytes:
    buf = b""
    while len(buf) < n:
        if deadline is not None and not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise TimeoutError("no reply from zygote")
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError("zygote closed its pipe")
        buf += chunk
    return buf


def _checked(buf: bytes, max_output_chars: int) -> dict:
    """A task's result frame may be forged by the program: accept only the schema, and only values that
    parse (SPEC rule 3) within the output cap."""
    bad = {"status": "crash", "value": None, "error": "Crash: malformed result frame"}
    try:
        frame = json.loads(buf[4:])
    except (ValueError, RecursionError):  # `[[[[...` nested past the recursion limit is RecursionError
        return bad
    if (not isinstance(frame, dict) or set(frame) != {"status", "value", "error"}
            or frame["status"] not in STATUSES
            or not all(x is None or isinstance(x, str) for x in (frame["value"], frame["error"]))
            or (frame["status"] == "ok") != isinstance(frame["value"], str)):
        return bad
    if frame["status"] == "ok":
        try:
            if len(frame["value"]) > max_output_chars:
                raise ValueError("over the output cap")
            parse_value(frame["value"])
        except ValueError:
            return bad
    return frame


def _read_frame_bytes(fd, deadline=None, cap=1 << 30) -> bytes:
    head = _read_exact(fd, 4, deadline)
    (n,) = struct.unpack(">I", head)
    if n > cap:
        raise ValueError(f"frame of {n} bytes over the {cap} cap")
    return head + _read_exact(fd, n, deadline)


def _read_frame(fd, deadline=None, cap=1 << 30):
    return json.loads(_read_frame_bytes(fd, deadline, cap)[4:])


# ---------------------------------------------------------------------------------------------------------
# Zygote side: runs as `python -s -S -P executor.py --zygote CONFIG`, talks frames on fds 0/1.

_IDLE_S = 0.05  # a zygote's spare child outlives the last task by this much, at most


class _Task(NamedTuple):
    """A forked child, confined and waiting for its job, as the zygote holds it."""
    pid: int
    pidfd: int      # readable once the child has exited
    job_w: int      # the zygote writes the job frame here
    result_r: int   # the child writes its one result frame here
    task_dir: str


class _Zygote:
    def __init__(self, cfg):
        self.cfg = cfg
        self.pid = os.getpid()
        self.layers, self.skipped = [], {}
        self.read_dirs = sorted({p for p in sys.path if os.path.isdir(p)} |
                                {d for d in ("/usr", "/lib", "/lib64") if os.path.isdir(d)})
        self.uid = None
        self.landlock_abi = 0
        self.seccomp_prog = None
        self.serial = 0
        self.isolated = False  # whether two tasks' children may live at once: see detect_layers
        self.page_size = os.sysconf("SC_PAGE_SIZE")

    # -- start: detect layers, each confirmed by a probe child that applies it and runs a smoke test --
    def detect_layers(self):
        wanted = self.cfg["layers"]
        root = os.geteuid() == 0
        if "netns" in wanted:
            try:
                uid, gid = os.geteuid(), os.getegid()  # before a new user namespace hides them
                new = CLONE_NEWNET if root else CLONE_NEWUSER | CLONE_NEWNET
                # A private IPC namespace too, where the kernel allows it: SysV IPC and POSIX message
                # queues made by tasks then never reach the host's (seccomp also denies making them).
                if _libc.unshare(new | CLONE_NEWIPC) < 0:
                    _check(_libc.unshare(new), f"unshare({new:#x})")
                if not root:
                    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                                       ("gid_map", f"{gid} {gid} 1")):
                        with open(f"/proc/self/{name}", "w") as fh:
                            fh.write(text)
                    _drop_capabilities()  # the new user namespace granted them; nothing here needs them
                self.layers.append("netns")
            except OSError as e:
                self.skipped["netns"] = str(e)
        candidates = []
        if "uid" in wanted:
            if root:
                candidates.append(("uid", lambda: setattr(self, "uid", self.cfg["uid"])))
            else:
                self.skipped["uid"] = "not root: children keep the caller's uid"
        if "nocaps" in wanted and root:
            candidates.append(("nocaps", lambda: None))
        if "landlock" in wanted:
            abi = _landlock_abi()
            if abi < 1:
                self.skipped["landlock"] = f"not supported by this kernel: {os.strerror(ctypes.get_errno())}"
            else:
                candidates.append(("landlock", lambda: setattr(self, "landlock_abi", abi)))
        if "seccomp" in wanted:
            if os.uname().machine != "x86_64":
                self.skipped["seccomp"] = f"the filter's syscall table is x86-64 only, not {os.uname().machine}"
            else:
                candidates.append(("seccomp", lambda: setattr(self, "seccomp_prog", _seccomp_program())))
        for name, enable in candidates:
            saved = (self.uid, self.landlock_abi, self.seccomp_prog)
            enable()
            self.layers.append(name)
            task = self.fork_task()
            self.send(task, _frame({"program": _PROBE_PROGRAM, "inputs": ""}))
            r = _checked(self.answer(task), self.cfg["max_output_chars"])
            if r["status"] != "ok":
                self.layers.pop()
                self.uid, self.landlock_abi, self.seccomp_prog = saved
                self.skipped[name] = f"probe task failed with it: {r['error'] or r['status']}"
        if "nocaps" in self.layers and "uid" in self.layers:
            self.layers.remove("nocaps")  # a non-zero uid holds no capabilities anyway
        # Landlock keeps a task out of other task dirs and (with ptrace) other domains' processes. Signals
        # take both: Landlock's signal scoping (ABI >= 6, SIGIO included) does not cover renicing or pinning
        # another process, and seccomp's denylist may miss a way to signal that the kernel scope covers.
        self.isolated = "landlock" in self.layers and self.landlock_abi >= 6 and "seccomp" in self.layers

    # -- the child: forked before its job arrives, it confines itself, then waits for the job --
    def child(self, job_r, w, task_dir, as_limit):
        """Always ends in os._exit. Everything before the job is read is the same for every task, so it
        runs before the job arrives: a task pays only for its pipe hops and the program."""
        try:
            self.confine(job_r, w, task_dir, as_limit)
        except BaseException as e:  # setup failed: never run the program unconfined
            frame = {"status": "internal", "value": None,
                     "error": f"sandbox setup failed: {type(e).__name__}: {e}"[:1000]}
        else:
            # A fork copies each page on the first write to it. A fixed warm-up call takes most of the copies
            # the real call needs (parser, compiler, json) before the job arrives, off the task's clock.
            self.call("def f(x):\n    return [x, {'k': (x,)}]", "1")
            try:
                job = _read_frame(job_r)
            except BaseException:  # the zygote is gone: nobody to answer
                os._exit(0)
            os.close(job_r)
            frame = self.call(job["program"], job["inputs"])
        try:
            _write_all(w, _frame(frame))
        finally:
            os._exit(0)

    def confine(self, job_r, w, task_dir, as_limit):
        os.setsid()
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != self.pid:
            os._exit(1)
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        low = 3
        for keep in sorted((job_r, w)):
            os.closerange(low, keep)
            low = keep + 1
        os.closerange(low, 1 << 20)
        os.chdir(task_dir)
        os.umask(0o077)
        cpu = math.ceil(self.cfg["timeout"]) + 1
        for res, lim in ((resource.RLIMIT_AS, as_limit), (resource.RLIMIT_CPU, cpu),
                         (resource.RLIMIT_FSIZE, 8 << 20), (resource.RLIMIT_NOFILE, 64),
                         (resource.RLIMIT_CORE, 0)):
            soft, hard = lim, lim + (res == resource.RLIMIT_CPU)
            old_hard = resource.getrlimit(res)[1]
            if old_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, old_hard), min(hard, old_hard)
            resource.setrlimit(res, (soft, hard))
        if "uid" in self.layers:
            resource.setrlimit(resource.RLIMIT_NPROC, (16, 16))
            os.setgroups([])
            os.setresgid(self.uid, self.uid, self.uid)
            os.setresuid(self.uid, self.uid, self.uid)
        elif "nocaps" in self.layers:
            _drop_capabilities()
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        if "landlock" in self.layers:
            _landlock(self.landlock_abi, task_dir, self.read_dirs)
        if "seccomp" in self.layers:
            _seccomp(self.seccomp_prog)

    def call(self, program, inputs):
        """SPEC rules 3-4 inside the sandbox: parse inputs, run the program, f(*args), repr, re-parse."""
        try:
            try:
                args, kwargs = parse_args(inputs)
            except ValueError as e:
                return {"status": "error", "value": None, "error": f"InvalidInput: {e}"}
            module = types.ModuleType("__main__")  # a real module: dataclasses and typing look it up
            sys.modules["__main__"] = module
            exec(compile(program, "<program>", "exec"), module.__dict__)
            f = module.__dict__.get("f")
            if not callable(f):
                return {"status": "error", "value": None, "error": "NameError: the program defines no function f"}
            result = f(*args, **kwargs)
            text = repr(result)
            if len(text) > self.cfg["max_output_chars"]:
                return {"status": "output_limit", "value": None,
                        "error": f"OutputLimit: repr has {len(text)} characters, over {self.cfg['max_output_chars']}"}
            try:
                parsed = parse_value(text)
            except ValueError as e:
                return {"status": "error", "value": None, "error": f"OutputNotAValue: {e}"}
            if not values_equal(result, parsed):
                return {"status": "error", "value": None,
                        "error": f"OutputNotAValue: repr of a {type(result).__name__} does not parse back to it"}
            return {"status": "ok", "value": text, "error": None}
        except MemoryError:
            return {"status": "memory", "value": None, "error": "MemoryError"}
        except BaseException as e:
            try:
                msg = str(e)
            except BaseException:
                msg = "<unprintable>"
            return {"status": "error", "value": None, "error": f"{type(e).__name__}: {msg}"[:1000]}

    # -- the zygote side of one task --
    def fork_task(self) -> _Task:
        """Fork the child for the next task, before the task is known (see `child`)."""
        self.serial += 1
        task_dir = os.path.join(self.cfg["base_dir"], str(self.serial))
        os.mkdir(task_dir, 0o700)
        if self.uid is not None:
            os.chown(task_dir, self.uid, self.uid)
        as_limit = int(_read_proc("/proc/self/statm").split()[0]) * self.page_size + (self.cfg["memory_mb"] << 20)
        job_r, job_w = os.pipe()
        result_r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            self.child(job_r, w, task_dir, as_limit)
        os.close(job_r)
        os.close(w)
        return _Task(pid, os.pidfd_open(pid), job_w, result_r, task_dir)

    @staticmethod
    def send(task, job: bytes):
        """Hand the job (a request frame) to the task's waiting child."""
        try:
            _write_all(task.job_w, job)
        except BrokenPipeError:
            pass  # the child died before reading it (setup failed): its frame or exit status tells why
        os.close(task.job_w)

    def answer(self, task, reply=lambda frame: None, spare=None):
        """`reply` gets the task's result as soon as it is known, before the (slower) cleanup."""
        frame = self.supervise(task)
        if frame is not None:
            reply(frame)  # a frame, a timeout or an overflow needs no exit status: answer before cleanup
        status = self.finish(task, spare)
        if frame is None:
            frame = self.exit_result(status)
            reply(frame)
        return frame

    def finish(self, task, spare=None) -> int:
        """Kill the task's process group, reap it, sweep its escapees (not the next task's child), remove
        its dir; its wait status."""
        status = _kill_task(task.pid)
        os.close(task.pidfd)
        os.close(task.result_r)
        _sweep(self.pid, keep=spare.pid if spare else None)
        _remove_tree(task.task_dir)
        return status

    def supervise(self, task):
        """Wait for the frame, the child's exit, the deadline, or the trainer's exit; the result, or None
        when only the exit status can tell."""
        r, pid = task.result_r, task.pid
        poller = select.poll()
        for fd in (r, task.pidfd, 0):
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + self.cfg["timeout"]
        buf, exited, trainer_gone, timed_out = b"", False, False, False
        while not _complete(buf) and len(buf) <= _FRAME_CAP and not exited:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for fd, ev in poller.poll(remaining * 1000):
                if fd == r:
                    chunk = os.read(r, _FRAME_CAP)
                    buf += chunk
                    if not chunk:
                        poller.unregister(r)  # all writers gone; the pidfd tells when the child exits
                elif fd == task.pidfd:
                    exited = True
                else:
                    trainer_gone = True  # fd 0 is readable only at EOF while a task runs
            if trainer_gone:
                break
        if exited:  # the child may have written its frame just before exiting
            os.set_blocking(r, False)
            try:
                while len(buf) <= _FRAME_CAP and (chunk := os.read(r, _FRAME_CAP)):
                    buf += chunk
            except BlockingIOError:
                pass
        if trainer_gone:
            _kill_task(pid)
            _sweep(self.pid)
            sys.exit(0)
        return self.result(buf, timed_out)

    def result(self, buf, timed_out):
        """The child's frame is passed on as bytes, unparsed: the trainer checks it (`_checked`). Parsing it
        here would make the zygote write to memory it shares with its children: a page copy per page."""
        if _complete(buf) and 4 + struct.unpack(">I", buf[:4])[0] <= _FRAME_CAP:
            return buf[:4 + struct.unpack(">I", buf[:4])[0]]
        if timed_out:
            return _frame({"status": "timeout", "value": None, "error": f"Timeout: over {self.cfg['timeout']} s"})
        if len(buf) > _FRAME_CAP or _complete(buf):
            return _frame({"status": "crash", "value": None, "error": "Crash: result frame over 64 KiB"})
        return None  # the child exited without a frame: its exit status tells why

    @staticmethod
    def exit_result(status):
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig == signal.SIGXCPU:
                return _frame({"status": "timeout", "value": None, "error": "Timeout: CPU time limit"})
            return _frame({"status": "crash", "value": None, "error": f"Crash: killed by {signal.Signals(sig).name}"})
        return _frame({"status": "crash", "value": None,
                       "error": f"Crash: exited with status {os.WEXITSTATUS(status)} without a result"})

    def serve(self):
        """Trainer requests, one at a time. The next task's child is forked while this task runs, so it is
        confined by the time its job comes, when the layers keep a task from reaching another task's child
        and dir (`isolated`); otherwise only once this task is cleaned up. A spare child left unused for
        _IDLE_S is retired, so an idle zygote holds no child and no task dir."""
        spare = None
        while True:
            if spare is not None and not select.select([0], [], [], _IDLE_S)[0]:
                self.finish(spare)
                spare = None
                continue
            try:
                job = _read_frame_bytes(0)
            except EOFError:
                if spare is not None:
                    self.finish(spare)
                return
            task = spare or self.fork_task()
            self.send(task, job)
            spare = self.fork_task() if self.isolated else None
            self.answer(task, lambda frame: _write_all(1, frame), spare)
            spare = spare or self.fork_task()


_PROBE_PROGRAM = """
import colorsys  # a stdlib module the zygote did not pre-import: imports must still work
def f():
    with open("probe.txt", "w") as fh:
        fh.write("ok")
    return open("probe.txt").read() + str(len(colorsys.__name__))
"""


def _kill_task(pid: int) -> int:
    """SIGKILL the task's process group and the task itself; reap it and return its wait status."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return os.waitpid(pid, 0)[1]


def _complete(buf: bytes) -> bool:
    return len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]


def _remove_tree(path: str):
    """Remove a task dir, also when the task chmod-ed its subdirs to 000. Never raises: a leftover file
    must not kill the zygote. Runs once the task's processes are dead, so nothing changes underfoot, and
    it never follows a symlink (chmod would follow it out of the dir)."""
    try:
        os.rmdir(path)  # most tasks write no files
        return
    except OSError:
        pass
    dirs = [path]
    while dirs:  # a loop, not recursion: a task may nest directories thousands deep
        d = dirs.pop()
        try:
            os.chmod(d, 0o700)
            with os.scandir(d) as entries:
                dirs += [e.path for e in entries if e.is_dir(follow_symlinks=False)]
        except OSError:
            pass
    shutil.rmtree(path, ignore_errors=True)


def _sweep(zygote_pid: int, keep: int | None = None):
    """Kill and reap every process re-parented to the (subreaper) zygote, generation by generation; all
    its children are tasks' descendants but `keep`, the next task's child."""
    for _ in range(1000):
        try:
            kids = [int(k) for k in _read_proc(f"/proc/{zygote_pid}/task/{zygote_pid}/children").split()]
        except FileNotFoundError:  # kernel without CONFIG_PROC_CHILDREN: scan /proc
            kids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == zygote_pid]
        kids = [k for k in kids if k != keep]
        if not kids:
            return
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for k in kids:
            try:
                os.waitpid(k, 0)
            except ChildProcessError:
                pass


def _read_proc(path: str) -> bytes:
    """A small /proc file, read without building Python file objects: in a zygote every object built
    writes to memory it shares with its children, which costs a page copy per page touched."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def _ppid(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _zygote_main(cfg_json: str):
    cfg = json.loads(cfg_json)
    for name in _PREIMPORTS:
        __import__(name)
    import gc
    import random
    random.seed(cfg["hashseed"])
    assert "threading" not in sys.modules, "its at-fork hook would slow every task: see the imports at the top"
    sys.set_int_max_str_digits(4300)  # the same everywhere: it decides which big-int reprs fail
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    zygote = _Zygote(cfg)
    zygote.detect_layers()
    missing = [name for name in cfg["required"] if name not in zygote.layers]
    if missing:  # the executor's first zygote had them: never run tasks with fewer layers than it did
        why = "; ".join(f"{name}: {zygote.skipped.get(name, 'not requested')}" for name in missing)
        _write_all(1, _frame({"refused": f"required layers unavailable ({why})"}))
        return
    gc.collect()
    gc.freeze()  # keep pre-imported objects' pages shared between forks
    _write_all(1, _frame({"layers": zygote.layers, "skipped": zygote.skipped}))
    zygote.serve()


# ---------------------------------------------------------------------------------------------------------
# Trainer side.

LAYERS = ("netns", "uid", "nocaps", "landlock", "seccomp")
_UID_BASE = 61000


class _ZygoteProcess:
    """One zygote as seen by the trainer; restarted lazily after it dies or misbehaves."""

    def __init__(self, index, hashseed, cfg):
        self.index, self.hashseed, self.cfg = index, hashseed, cfg
        self.proc, self.base_dir, self.hello = None, None, None
        self.starts = 0

    def start(self):
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # tmpfs: ~20 us per task dir, not ~10 ms
        self.base_dir = tempfile.mkdtemp(prefix="azr-exec-", dir=shm)
        os.chmod(self.base_dir, 0o711)
        cfg = dict(self.cfg, hashseed=self.hashseed, base_dir=self.base_dir, uid=_UID_BASE + self.index)
        env = {"PYTHONHASHSEED": str(self.hashseed), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-s", "-S", "-P", os.path.abspath(__file__), "--zygote", json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=self.base_dir, start_new_session=True, close_fds=True)
        self.starts += 1
        try:
            self.hello = _read_frame(self.proc.stdout.fileno(), time.monotonic() + 60, _FRAME_CAP)
        except (OSError, EOFError, ValueError) as e:
            self.stop()
            raise RuntimeError(f"executor zygote failed to start ({e}); run `{sys.executable} -s -S -P "
                               f"{os.path.abspath(__file__)} --zygote '{{...}}'` by hand to see why") from None
        if "refused" in self.hello:
            self.stop()
            log.warning("executor: zygote %d refused to start: %s", self.index, self.hello["refused"])
            raise RuntimeError(f"executor zygote refused to start: {self.hello['refused']}")

    def call(self, program, inputs) -> Result:
        if self.proc is None or self.proc.poll() is not None:
            if self.starts:
                log.warning("executor: zygote %d restarting (its last one exited with %s)", self.index,
                            None if self.proc is None else self.proc.returncode)
            self.stop()
            self.start()
        try:
            _write_all(self.proc.stdin.fileno(), _frame({"program": program, "inputs": inputs}))
            buf = _read_frame_bytes(self.proc.stdout.fileno(), time.monotonic() + self.cfg["timeout"] + 30, _FRAME_CAP)
        except (OSError, EOFError, ValueError) as e:
            self.stop()
            return Result("internal", None, f"Internal: zygote lost ({type(e).__name__}: {e})")
        frame = _checked(buf, self.cfg["max_output_chars"])
        return Result(frame["status"], frame["value"], frame["error"])

    def stop(self):
        if self.proc is not None:
            for stream in (self.proc.stdin, self.proc.stdout):
                stream.close()  # EOF on stdin makes the zygote kill its task and exit
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self.base_dir is not None:
            _remove_tree(self.base_dir)
            self.base_dir = None


class _Slot:
    def __init__(self, index, cfg):
        self.canonical = _ZygoteProcess(2 * index, 0, cfg)
        self.probe = _ZygoteProcess(2 * index + 1, 1, cfg)  # started on first determinism check

    def run(self, program, inputs, check_determinism) -> Result:
        try:
            return self.checked_run(program, inputs, check_determinism)
        except Exception as e:  # e.g. a zygote that cannot restart: this task only
            return Result("internal", None, f"Internal: {type(e).__name__}: {e}")

    def checked_run(self, program, inputs, check_determinism) -> Result:
        first = self.canonical.call(program, inputs)
        if not check_determinism or first.status != "ok":
            return first
        second = self.probe.call(program, inputs)
        if second.status == "internal":
            return second
        if second.status == "ok" and values_equal(parse_value(first.value), parse_value(second.value)):
            return first
        got = second.value if second.status == "ok" else f"{second.status} ({second.error})"
        return Result("error", None, f"Nondeterministic: {first.value[:200]} then {got[:200]} "
                                     f"with another hash seed")


class Executor:
    """Runs `f(*args, **kwargs)` of model-written programs in sandboxed forks of `workers` zygotes."""

    def __init__(self, workers: int = os.cpu_count() or 1, timeout: float = 10.0, memory_mb: int = 1024,
                 max_output_chars: int = 400, layers: tuple[str, ...] = LAYERS):
        if workers < 1 or timeout <= 0 or memory_mb < 16 or max_output_chars < 1:
            raise ValueError("Executor needs workers >= 1, timeout > 0, memory_mb >= 16, max_output_chars >= 1")
        unknown = set(layers) - set(LAYERS)
        if unknown:
            raise ValueError(f"unknown executor layers {sorted(unknown)}; choose from {LAYERS}")
        cfg = {"timeout": float(timeout), "memory_mb": int(memory_mb),
               "max_output_chars": int(max_output_chars), "layers": list(layers), "required": []}
        self.slots = [_Slot(i, cfg) for i in range(workers)]
        self._free = queue.Queue()
        try:
            for i, slot in enumerate(self.slots):
                slot.canonical.start()
                if i == 0:  # its layers are required of every later zygote (other workers, determinism
                    # zygotes, restarts: all share cfg), which refuses to start with fewer, e.g. when
                    # /dev/shm is full and every probe fails
                    cfg["required"] = slot.canonical.hello["layers"]
                self._free.put(slot)
        except BaseException:
            self.close()
            raise
        hello = self.slots[0].canonical.hello
        self.layers, self.skipped = tuple(hello["layers"]), dict(hello["skipped"])
        log.info("executor: %d workers, layers active: %s", workers, ", ".join(self.layers) or "none")
        for name, why in hello["skipped"].items():
            log.info("executor: layer %s skipped: %s", name, why)

    def run(self, program: str, inputs: str) -> Result:
        if not (isinstance(program, str) and isinstance(inputs, str)):
            raise TypeError("run takes program: str and inputs: str")
        slot = self._free.get()
        try:
            return slot.run(program, inputs, False)
        finally:
            self._free.put(slot)

    def run_batch(self, jobs: list[tuple[str, str]], check_determinism: bool = False) -> list[Result]:
        for job in jobs:
            if not (isinstance(job, (tuple, list)) and len(job) == 2 and all(isinstance(s, str) for s in job)):
                raise TypeError("run_batch takes a list of (program: str, inputs: str) tuples")
        results: list[Result | None] = [None] * len(jobs)
        pending = iter(range(len(jobs)))
        lock = threading.Lock()

        def drain():
            slot = self._free.get()
            try:
                while True:
                    with lock:
                        i = next(pending, None)
                    if i is None:
                        return
                    results[i] = slot.run(*jobs[i], check_determinism)
            finally:
                self._free.put(slot)

        threads = [threading.Thread(target=drain, daemon=True) for _ in range(min(len(self.slots), len(jobs)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    def close(self):
        for slot in self.slots:
            slot.canonical.stop()
            slot.probe.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__" and sys.argv[1:2] == ["--zygote"]:
    _zygote_main(sys.argv[2])
