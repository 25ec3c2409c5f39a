"""A fork-server sandbox for model-written Python, and the value semantics every AZR reward uses.

SPEC sections 3-4. The trainer never runs model code and never forks itself (it holds CUDA/NCCL threads).
It spawns `workers` clean, single-threaded *zygote* interpreters (`python -s -S -P`, scrubbed environment,
fixed PYTHONHASHSEED, common stdlib modules pre-imported, `gc.freeze()`d). Each job runs in a fresh fork of
a zygote. Nothing that comes back is ever pickled or evaluated: the trainer checks every result frame's
schema and re-checks its value (`_checked`: `parse_value`, the AST whitelist below, no inf/nan, text and
repr within `max_output_chars`), whatever the frame claims.

    with Executor(workers=2) as ex:
        ex.run("def f(a):\n    return sorted(a)", "[3, 1, 2]")   # Result('ok', '[1, 2, 3]', None)
        ex.run("def f(a):\n    return a * 2", ["1", "'x'"])       # [Result('ok', '2', ..), Result('ok', "'xx'", ..)]
        ex.run_batch([(prog, "1"), (prog, ["1", "2"])], check_determinism=True)  # [Result, [Result, Result]]

A job is (program, inputs): one input text, or a list of them that run one after another in one task child
(induction: 10 inputs to validate, 5 hidden ones to grade). Each input gets its own Result and its own
timeout (the trainer times it from the previous input's result); the program runs afresh (a new module) for
each input. An input that ends its child (timeout, crash, os._exit) gets that status and the inputs after it
run in a fresh child, so one input never changes another's result. Lists longer than 16 use several children.
What a program leaves in the process outside its module (an attribute on `math`, a changed builtin, a thread)
is still there for the next input of the same child: the determinism check below runs each input alone, so
an output that depends on it is refused there.

No task data in the zygote (so none in any later fork): per job the trainer makes two pipes, writes the job
into one, and passes the job's read end and the other's write end to the zygote as file descriptors over a
socket; the zygote hands them on to a waiting child and closes its copies. The child reads its job and writes
its result frames straight to the trainer. The zygote only ever holds fds and numbers (the input count; a
per-job verdict: timed out or the child's wait status), never a job's or a result's bytes.

Per job, in the child (all but the CPU limit before the job arrives, with a fixed warm-up call, so a job
pays for its pipe hops and the program) and around it (zygote):
  - own session and process group; parent-death SIGKILL; every inherited fd closed but its socket to the
    zygote; stdin, stdout, stderr on /dev/null (prints are discarded, `input()` raises EOFError at once);
  - cwd = a fresh 0700 task dir, umask 077; with mountns a tmpfs of its own (64 MiB, 16k inodes) that one
    unmount removes whole, otherwise a dir on /dev/shm removed by an iterative, fd-based walk that never
    follows a link; either way by the zygote, in a parent dir that is root's (read-only with mountns);
  - rlimits: address space = zygote size + memory_mb, file size 8 MiB, 64 fds, no core dumps, with the uid
    layer 16 threads and processes for the uid (its zygote's alone: see below); once the input count is
    known (before any program code), CPU = (timeout + 1 s) per input;
  - wall clock: the trainer times each input; the zygote kills the child at n inputs x timeout (or as soon as
    the trainer has all it wants), SIGKILLs its process group, then sweeps (kills and reaps) every process
    re-parented to it (it is a subreaper, or PID 1 of its namespace), so setsid/double-fork escapees go too;
  - the trainer reads each result frame as soon as it is complete, never waiting for EOF (a grandchild
    holding the pipe cannot stall a finished job); a frame over 64 KiB or off-schema is a `crash`;
  - the next job's child is forked while a job runs when the layers keep a task from reaching another
    task's child and dir (Landlock with signal scoping, ABI >= 6, and seccomp), otherwise after the cleanup;
    one unused for 50 ms is retired, so an idle executor holds no child and no task dir.

Defence layers, each detected when a zygote starts, confirmed by a probe task, logged, and skipped with the
reason when the kernel or the machine refuses it. The first zygote fixes the set: a later one (restart, other
worker, determinism) that cannot enable all of them refuses to start, and its jobs are `internal`. A root
trainer whose tasks cannot get the uid layer refuses to start unless `unsafe=True`: a task running as uid 0,
even without capabilities, owns every root-owned file.

  netns     stops: the network (a net namespace; userns + netns when not root); the host's SysV IPC (an IPC
            namespace). Without it: TCP/UDP to the host unless Landlock (TCP) or seccomp (socket) refuse it.
  pidns     stops: seeing, signalling or pidfd-opening any host process, the trainer included (the zygote
            is PID 1 of a PID namespace with its own /proc, hidepid; a UTS namespace: another hostname);
            every task process dies with the zygote. Without it: /proc lists host processes (Landlock
            forbids reading it, not stat), and escapees can outlive a zygote that is killed.
  mountns   stops: seeing host files. The zygote pivot_roots into a tmpfs holding only the stdlib dirs and
            /usr, /lib*, bound read-only at their own paths (sys.path unchanged, traversable by the task uid
            however private their parents are: a pyenv under a 0700 /root), its /proc, and /task, where each
            task gets its own tmpfs (a hard link or rename out of it is EXDEV). Without it: stat of any path,
            reads Landlock allows, and no uid layer where the stdlib's parents are private.
  uid       stops: everything DAC stops. Tasks run as a uid of their own, no groups: 61000 + k, claimed by an
            flock on /run/azr-executor/<uid> that the zygote holds until it dies, so no two live zygotes on the
            machine share one (other executors, other processes); RLIMIT_NPROC 16 caps its threads. Without
            it, as root: the task owns every root-owned file (only seccomp keeps chmod, utime, xattrs off them),
            has no thread cap, and reaches other uid-0 tasks' processes wherever Landlock does not.
  nocaps    stops: capabilities of a task that stays uid 0 (root without the uid layer, or in a userns).
  landlock  stops: writes outside the task dir; reads outside the stdlib, /usr, /lib*; TCP; signals, ptrace
            (so /proc/<pid>/mem) and abstract unix sockets outside the task's own domain (ABI >= 6). Without
            it: without mountns, reads of /etc, /home, the project; another task's dir under the same uid.
  seccomp   stops (x86-64 BPF, EPERM): sockets, exec, fork (threads allowed), kill and friends, ptrace,
            setrlimit (but of its own CPU limit), mount/unshare/setns/pivot_root, pidfd_open/getfd, bpf,
            io_uring, keyctl, SysV IPC and mqueues, memfd_create, the chmod/chown/utime/xattr families (even
            on the task's own files), every ioctl but six terminal and fd queries (so no FS_IOC_SETFLAGS,
            FIOSETOWN, TIOCSTI), fcntl F_SETOWN, F_SETSIG, F_SETLEASE, F_NOTIFY, inotify and fanotify,
            sync and syncfs, scheduling of any process but the caller.
            Without it: renicing and SIGIO to same-uid processes, IPC between one zygote's tasks, RAM in
            memfds outside the limits, inotify on what the task can see, and, as uid 0, metadata of root's files.

With every layer on (this machine: root, pyenv under a 0700 /root, Linux 6.18) a task sees the stdlib, /usr,
its own tmpfs and its own processes, runs as its own uid with no capabilities, and can still: read
world-readable files under /usr and the stdlib, stat paths in them; use CPU up to its limits and RAM up to
memory_mb (plus 64 MiB in its tmpfs) per running task, with no cgroup for the sum over workers; forge its own
result frames (it can only claim values for f, which it controls anyway, and the trainer re-checks them; it
cannot claim `internal`, which only the executor reports); exploit a kernel bug (run the whole trainer in a VM
or container for hostile code). Tasks that cooperate can still signal to each other: through CPU load and
timing, and through the pids their zygote's namespace hands out (a task's thread count moves a later task's
pid). No task can read what another did not send it; each has its own /dev/null (file flags are per open file).

Determinism (SPEC rule 5): `check_determinism=True` re-runs every input that ran `ok` in a second zygote per
worker, started lazily, that differs in what a cheating program could read: another PYTHONHASHSEED (set
order, hash()), another process (heap and ASLR layout, id(); `random` is reseeded at every fork anyway),
monotonic and boot clocks 11.7 days ahead (a time namespace, where the kernel allows it: a warning says when
not), a time zone 13.5 hours east, and each input alone in a child of its own (outputs that depend on the
inputs run before it in the same process). An input is `error: Nondeterministic` unless the second run is
also `ok` with a value equal by `values_equal` (values, not reprs). It cannot see: the wall clock
(time.time(), UTC dates) rounded to a second or more, as the second run follows within milliseconds;
addresses of static objects in a non-PIE interpreter or with ASLR off; anything the same in both runs by
construction (the machine, the stdlib, the layout of /task, a first input's empty history).
"""
import ast
import ctypes
import fcntl
import json
import math
import os
import resource
import select
import signal
import socket
import stat
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
CLONE_NEWTIME, CLONE_THREAD, CLONE_NEWNS, CLONE_NEWUTS = 0x80, 0x10000, 0x20000, 0x04000000
CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x08000000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MNT_DETACH = 2
# statvfs flags equal to the MS_ flags of the same name: a read-only bind must keep them (locked in a userns)
_KEPT_MOUNT_FLAGS = MS_NOEXEC | 1024 | 2048 | 4096  # | ST_NOATIME | ST_NODIRATIME | ST_RELATIME
SYS_landlock_create_ruleset, SYS_landlock_add_rule, SYS_landlock_restrict_self = 444, 445, 446
SYS_pivot_root = 155


def _check(ret, what):
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _prctl(option, arg2=0):
    _check(_libc.prctl(option, ctypes.c_ulong(arg2), 0, 0, 0), f"prctl({option})")


def _unshare(flags):
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


def _mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    ret = _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))
    _check(ret, f"mount({target})")


def _mount_proc(target):
    """A fresh proc for this PID namespace. Processes of other uids stay invisible and there is nothing but
    process dirs (no /proc/sys, kcore, ...) where the kernel knows these options (5.8+)."""
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    try:
        _mount("proc", target, "proc", flags, "hidepid=invisible,subset=pid")
    except OSError:
        _mount("proc", target, "proc", flags)


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
# memory_mb, and a channel to the determinism re-run); metadata calls reach files Landlock cannot guard (it has
# no right for chmod, chown, utime or xattrs, and a task running as uid 0 owns every root-owned file); inotify
# and fanotify tell names in directories a task cannot list; sync and syncfs make the host flush every dirty page
# (seconds of I/O stall for a trainer writing a checkpoint); the others reach other processes or the kernel.
_DENIED = dict(socket=41, socketpair=53, execve=59, execveat=322, fork=57, vfork=58, ptrace=101,
               process_vm_readv=310, process_vm_writev=311, kill=62, tkill=200, tgkill=234,
               rt_sigqueueinfo=129, rt_tgsigqueueinfo=297, pidfd_send_signal=424, pidfd_getfd=438,
               pidfd_open=434, setsid=112, setpgid=109, setrlimit=160, mount=165, umount2=166, unshare=272,
               setns=308, chroot=161, pivot_root=155, open_tree=428, move_mount=429, fsopen=430, fsconfig=431,
               fsmount=432, fspick=433, mount_setattr=442, bpf=321, io_uring_setup=425, io_uring_enter=426,
               io_uring_register=427, keyctl=250, add_key=248, request_key=249, perf_event_open=298,
               userfaultfd=323, kexec_load=246, init_module=175, finit_module=313, delete_module=176,
               reboot=169, swapon=167, swapoff=168, acct=163, settimeofday=164, name_to_handle_at=303,
               open_by_handle_at=304, mknod=133, mknodat=259, setuid=105, setgid=106, setreuid=113,
               setregid=114, setresuid=117, setresgid=119, setgroups=116, capset=126, personality=135,
               kcmp=312, process_madvise=440, syslog=103, vhangup=153, iopl=172, ioperm=173,
               quotactl=179, move_pages=279, migrate_pages=256, memfd_create=319, memfd_secret=447,
               shmget=29, shmat=30, shmctl=31, semget=64, semop=65, semctl=66, semtimedop=220,
               msgget=68, msgsnd=69, msgrcv=70, msgctl=71, mq_open=240,
               chmod=90, fchmod=91, fchmodat=268, fchmodat2=452, chown=92, fchown=93, lchown=94,
               fchownat=260, utime=132, utimes=235, futimesat=261, utimensat=280, setxattr=188,
               lsetxattr=189, fsetxattr=190, removexattr=197, lremovexattr=198, fremovexattr=199,
               setxattrat=463, removexattrat=466, inotify_init=253, inotify_init1=294,
               inotify_add_watch=254, fanotify_init=300, fanotify_mark=301, sync=162, syncfs=306)
_SYS_clone, _SYS_clone3, _SYS_prlimit64, _SYS_fcntl, _SYS_ioctl = 56, 435, 302, 72, 16
_SYS_setpriority, _SYS_ioprio_set = 141, 251
_SYS_sched_setparam, _SYS_sched_setscheduler, _SYS_sched_setaffinity, _SYS_sched_setattr = 142, 144, 203, 314
F_SETOWN, F_SETSIG, F_SETOWN_EX, F_SETLEASE, F_NOTIFY = 8, 10, 15, 1024, 1026
# The only ioctls a task may make (terminal queries, fd flags): none sets file flags (FS_IOC_SETFLAGS), a
# file owner for SIGIO (FIOSETOWN) or injects terminal input (TIOCSTI).
_IOCTLS = dict(TCGETS=0x5401, TIOCGWINSZ=0x5413, FIONREAD=0x541B, FIONBIO=0x5421, FIONCLEX=0x5450, FIOCLEX=0x5451)
PRIO_PROCESS, IOPRIO_WHO_PROCESS, RLIMIT_CPU = 0, 1, 0


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

    def one_of(offset, values, hit, miss):  # `hit` when the word is one of `values`, else `miss`
        body = [insn(LD, offset)] + [insn(JEQ, v, len(values) - i, 0) for i, v in enumerate(values)]
        return body + [insn(RET, miss), insn(RET, hit)]

    # Calls allowed or denied by their arguments. Each body ends in RET, so a call that is not this rule's
    # skips the body with its number still loaded. Arguments that the kernel reads as int are checked on
    # their low 32 bits, which is all the kernel uses.
    rules = {
        _SYS_clone3: [insn(RET, ENOSYS)],                                    # glibc then falls back to clone
        _SYS_clone: [insn(LD, arg(0)), insn(JSET, CLONE_THREAD, 0, 1), insn(RET, ALLOW), insn(RET, EPERM)],
        # reading limits; and setting its own CPU limit, which a child does once, before the program runs,
        # lowering the hard limit to what its job needs (raising it takes CAP_SYS_RESOURCE)
        _SYS_prlimit64: [insn(LD, arg(1)), insn(JEQ, RLIMIT_CPU, 0, 3), insn(LD, arg(0)), insn(JEQ, 0, 0, 1),
                         insn(RET, ALLOW)] + allow_only_if([(arg(2), 0), (arg(2, high=True), 0)]),
        # SIGIO: a file owner set to another process gets signalled when the file becomes ready; leases and
        # dnotify signal on other processes' accesses
        _SYS_fcntl: one_of(arg(1), [F_SETOWN, F_SETSIG, F_SETOWN_EX, F_SETLEASE, F_NOTIFY], EPERM, ALLOW),
        _SYS_ioctl: one_of(arg(1), list(_IOCTLS.values()), ALLOW, EPERM),
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
# Framing. A job travels trainer -> task child as one JSON object in a pipe the trainer fills and closes; each
# result travels task child -> trainer as a 4-byte big-endian length + UTF-8 JSON {status, value, error}.
# Trainer <-> zygote messages are datagrams on a SOCK_SEQPACKET socket: file descriptors and numbers only.

_FRAME_CAP = 64 << 10   # one result frame
_JOB_CAP = 1 << 20      # one job (program and inputs): the most a pipe holds, so the trainer never blocks
_ERROR_CAP = 1000       # characters of a result's error text
_MAX_BATCH = 16         # inputs per task child; a longer list runs in several children, transparently
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


def _drain(fd) -> bytes:
    """Everything in a pipe now, without waiting for more (or for EOF: a grandchild may hold the write end)."""
    os.set_blocking(fd, False)
    buf = b""
    try:
        while chunk := os.read(fd, _FRAME_CAP):
            buf += chunk
    except BlockingIOError:
        pass
    return buf


def _split_frames(buf: bytes) -> tuple[list[bytes], bytes]:
    """The complete frames at the start of `buf` and the rest; ValueError on a frame over the cap."""
    frames = []
    while len(buf) >= 4:
        (n,) = struct.unpack(">I", buf[:4])
        if n > _FRAME_CAP:
            raise ValueError(f"result frame over {_FRAME_CAP >> 10} KiB")
        if len(buf) < 4 + n:
            break
        frames.append(buf[4:4 + n])
        buf = buf[4 + n:]
    return frames, buf


def _finite(v) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, complex):
        return math.isfinite(v.real) and math.isfinite(v.imag)
    if isinstance(v, dict):
        return all(_finite(x) for item in v.items() for x in item)
    if isinstance(v, (list, tuple, set, frozenset)):
        return all(map(_finite, v))
    return True


def _checked(payload: bytes, max_output_chars: int) -> Result:
    """A result frame may be forged by the program (it can write to its own result pipe): accept only the
    schema, and an `ok` value only if it parses as a safe value (SPEC rule 3) with no inf or nan and its text
    and its value's repr are within the output cap, whatever the frame claims."""
    bad = Result("crash", None, "Crash: malformed result frame")
    try:
        frame = json.loads(payload)
    except (ValueError, RecursionError):  # `[[[[...` nested past the recursion limit is RecursionError
        return bad
    if (not isinstance(frame, dict) or set(frame) != {"status", "value", "error"}
            or frame["status"] not in STATUSES or frame["status"] == "internal"  # only the executor says that
            or not all(x is None or isinstance(x, str) for x in (frame["value"], frame["error"]))
            or (frame["status"] == "ok") != isinstance(frame["value"], str)
            or (frame["status"] == "ok") != (frame["error"] is None)
            or len(frame["error"] or "") > _ERROR_CAP):
        return bad
    if frame["status"] == "ok":
        try:
            if len(frame["value"]) > max_output_chars:
                raise ValueError("over the output cap")
            value = parse_value(frame["value"])
            if not _finite(value) or len(repr(value)) > max_output_chars:
                raise ValueError("not a finite value within the output cap")
        except (ValueError, RecursionError):
            return bad
    return Result(frame["status"], frame["value"], frame["error"])
# ---------------------------------------------------------------------------------------------------------
# Zygote side: runs as `python -s -S -P executor.py --zygote CONFIG` with its socket to the trainer on fd 0.

_IDLE_S = 0.05            # a zygote's spare child outlives the last task by this much, at most
_TASK_FS = "size=64m,nr_inodes=16384"   # each task's own tmpfs (mountns): what its files may take
_UID_BASE, _UID_COUNT = 61000, 1000     # task uids: one per live zygote on the machine, claimed by a lock
_UID_LOCK_DIRS = ("/run/azr-executor", "/dev/shm/azr-executor-uids")
# The determinism zygote's monotonic and boot clocks run this far ahead (time namespace): 11.7 days and a
# fraction, a multiple of no round unit, so a value derived from them differs even rounded to a day.
_CLOCK_OFFSET = "1012345 678000000"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _Task:
    """A forked child, confined and waiting for its job's pipes, as the zygote holds it."""

    def __init__(self, pid, sock, task_dir):
        self.pid, self.sock, self.task_dir = pid, sock, task_dir
        self.pidfd = os.pidfd_open(pid)  # readable once the child has exited


class _Zygote:
    def __init__(self, cfg):
        self.cfg = cfg
        self.layers, self.skipped = [], {}
        self.read_dirs = sorted({p for p in sys.path if os.path.isdir(p)} |
                                {d for d in ("/usr", "/lib", "/lib64") if os.path.isdir(d)})
        self.probe_program = _probe_program(self.read_dirs)
        self.ctl = _socket(0)
        self.devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)  # tasks' stdio (no /dev in a private root)
        self.userns = False
        self.clock = "no offset" if not cfg["clock_offset"] else None
        self.uid = self.uid_lock = None
        self.landlock_abi = 0
        self.seccomp_prog = None
        self.task_root = cfg["base_dir"]
        self.serial = 0
        self.isolated = False  # whether two tasks' children may live at once: see detect_layers
        self.page_size = os.sysconf("SC_PAGE_SIZE")
        self.cpu = math.ceil(cfg["timeout"]) + 1
        self.compiled = (None, None)  # (program, code) of the job a child runs

    # -- start: namespaces first (they decide what this process is), then layers, each confirmed by a probe --
    def enter_namespaces(self) -> str | None:
        """Unshare what the kernel allows. A new PID (or time) namespace takes effect for children only, so this
        process forks once: the child, PID 1 of the new namespace, carries on as the zygote and this process
        only waits for it (and takes it down by parent-death signal if it is killed). An error text if the
        zygote cannot run (then there is nothing to undo but to exit)."""
        wanted = [n for n in ("netns", "pidns", "mountns") if n in self.cfg["layers"]]
        if os.geteuid() != 0 and (wanted or self.cfg["clock_offset"]):
            try:  # capabilities inside a user namespace of our own; children drop them ("nocaps")
                uid, gid = os.geteuid(), os.getegid()  # before the new namespace hides them
                _unshare(CLONE_NEWUSER)
                for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                                   ("gid_map", f"{gid} {gid} 1")):
                    with open(f"/proc/self/{name}", "w") as fh:
                        fh.write(text)
                self.userns = True
            except OSError as e:
                self.skipped.update({n: str(e) for n in wanted})
                self.clock, wanted = str(e), []
        if "netns" in wanted:
            try:  # with an IPC namespace where allowed: task-made SysV IPC never reaches the host's
                if _libc.unshare(CLONE_NEWNET | CLONE_NEWIPC) < 0:
                    _unshare(CLONE_NEWNET)
                self.layers.append("netns")
            except OSError as e:
                self.skipped["netns"] = str(e)
        if "pidns" in wanted or "mountns" in wanted:
            try:
                _unshare(CLONE_NEWNS)
                _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here reaches the host
            except OSError as e:
                self.skipped.update({n: str(e) for n in ("pidns", "mountns") if n in wanted})
            else:
                if "pidns" in wanted:
                    try:
                        _unshare(CLONE_NEWPID | CLONE_NEWUTS)
                        self.layers.append("pidns")
                    except OSError as e:
                        self.skipped["pidns"] = str(e)
                if "mountns" in wanted:
                    self.layers.append("mountns")  # the private root is built in detect_layers
        if self.cfg["clock_offset"] and self.clock is None:
            try:
                _unshare(CLONE_NEWTIME)
                with open("/proc/self/timens_offsets", "w") as fh:
                    fh.write(f"monotonic {_CLOCK_OFFSET}\nboottime {_CLOCK_OFFSET}\n")
                self.clock = "offset"
            except OSError as e:
                self.clock = str(e)
        if "pidns" in self.layers or self.clock == "offset":
            self.fork_into_namespaces()
        self.pid = os.getpid()
        if "pidns" in self.layers:
            try:
                _mount_proc("/proc")  # pids as this namespace sees them: the sweep kills by them
                name = b"azr-sandbox"
                _check(_libc.sethostname(name, len(name)), "sethostname")
            except OSError as e:
                return f"pidns: {e}; pass layers without 'pidns'"
        return None

    def fork_into_namespaces(self):
        alive_r, alive_w = os.pipe()  # EOF on it tells the child its parent died before PDEATHSIG was set
        pid = os.fork()
        if pid:
            for fd in (0, alive_r, self.devnull):
                os.close(fd)  # the child talks to the trainer; its EOF on fd 0 must not wait for us
            status = os.waitpid(pid, 0)[1]
            os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)
        os.close(alive_w)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # if our parent is killed, the whole namespace dies with us
        if select.select([alive_r], [], [], 0)[0]:
            os._exit(1)
        os.close(alive_r)

    def detect_layers(self) -> str | None:
        """The remaining layers, each enabled and confirmed by a probe task (skipped with the reason if the
        probe fails). An error text if even a probe without them fails."""
        wanted = self.cfg["layers"]
        root = os.geteuid() == 0
        uid_error = None
        if "uid" in wanted and root:
            try:  # before the private root hides the lock dir and passwd
                self.claim_uid()
            except OSError as e:
                uid_error = str(e)
        if "mountns" in self.layers:
            try:
                self.private_root()
            except OSError as e:
                self.layers.remove("mountns")
                self.skipped["mountns"] = f"cannot build the private root: {e}"
        r = self.probe()
        if r.status != "ok":
            return f"a probe task fails with the namespaces alone: {r.error or r.status}"
        candidates = []
        if "uid" in wanted:
            if uid_error:
                self.skipped["uid"] = uid_error
            elif root:
                candidates.append(("uid", lambda: None))
            else:
                self.skipped["uid"] = "not root: children keep the caller's uid"
        if "nocaps" in wanted and (root or self.userns):
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
            saved = (self.landlock_abi, self.seccomp_prog)
            enable()
            self.layers.append(name)
            r = self.probe()
            if r.status != "ok":
                self.layers.pop()
                self.landlock_abi, self.seccomp_prog = saved
                self.skipped[name] = f"probe task failed with it: {r.error or r.status}"
        if "uid" not in self.layers and self.uid_lock is not None:
            os.close(self.uid_lock)  # release the claim
            self.uid = self.uid_lock = None
        if "nocaps" in self.layers and "uid" in self.layers:
            self.layers.remove("nocaps")  # a non-zero uid holds no capabilities anyway
        # Landlock keeps a task out of other task dirs and (with ptrace) other domains' processes. Signals
        # take both: Landlock's signal scoping (ABI >= 6, SIGIO included) does not cover renicing or pinning
        # another process, and seccomp's denylist may miss a way to signal that the kernel scope covers.
        self.isolated = "landlock" in self.layers and self.landlock_abi >= 6 and "seccomp" in self.layers
        return None

    def private_root(self):
        """pivot_root into a tmpfs holding only the read dirs (bound read-only at their own paths, so sys.path is
        unchanged and traversable by the task uid however private their ancestors are, e.g. a pyenv under a
        0700 /root), a fresh /proc and /task, where each task gets a tmpfs of its own."""
        new = self.cfg["base_dir"]
        os.umask(0o022)  # the dirs made below must be traversable by the task uid
        _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m,nr_inodes=4096")
        try:
            bound = []
            for d in self.read_dirs:  # sorted: a dir comes before what is inside it
                if any(d.startswith(b + "/") for b in bound):
                    continue
                os.makedirs(os.path.dirname(new + d), 0o755, exist_ok=True)
                if os.path.islink(d):  # /lib -> usr/lib: the same link, to a target bound on its own
                    os.symlink(os.readlink(d), new + d)
                    continue
                os.mkdir(new + d, 0o755)
                _mount(d, new + d, None, MS_BIND)  # not MS_REC: mounts below d stay hidden
                kept = os.statvfs(d).f_flag & _KEPT_MOUNT_FLAGS
                _mount(None, new + d, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | kept)
                bound.append(d)
            os.mkdir(new + "/proc", 0o555)
            if "pidns" in self.layers:
                _mount("/proc", new + "/proc", None, MS_BIND)  # the one enter_namespaces made
            else:
                _mount_proc(new + "/proc")
            os.mkdir(new + "/task", 0o711)
            _mount("tmpfs", new + "/task", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                   "mode=0711,size=1m,nr_inodes=4096")
            os.mkdir(new + "/.old")
            _check(_libc.syscall(SYS_pivot_root, new.encode(), (new + "/.old").encode()), "pivot_root")
        except OSError:
            _libc.umount2(new.encode(), MNT_DETACH)
            raise
        os.chdir("/")
        _check(_libc.umount2(b"/.old", MNT_DETACH), "umount2(old root)")
        os.rmdir("/.old")
        _mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        self.task_root = "/task"

    def claim_uid(self):
        """A uid no other live zygote on this machine uses: an flock on <lock dir>/<uid>, which this process
        holds until it dies, when the kernel releases it. Two zygotes sharing a uid could signal each other's
        tasks and share one RLIMIT_NPROC count. Uids known to passwd or group are skipped."""
        import grp
        import pwd
        why = []
        for lock_dir in _UID_LOCK_DIRS:
            try:
                os.mkdir(lock_dir, 0o700)
            except FileExistsError:
                pass
            except OSError as e:
                why.append(str(e))
                continue
            st = os.lstat(lock_dir)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022:
                break
            why.append(f"{lock_dir} is not a directory only root can write")
        else:
            raise OSError(f"no lock directory for task uids ({'; '.join(why)})")
        for uid in range(_UID_BASE, _UID_BASE + _UID_COUNT):
            try:
                pwd.getpwuid(uid)
                continue
            except KeyError:
                pass
            try:
                grp.getgrgid(uid)
                continue
            except KeyError:
                pass
            fd = os.open(f"{lock_dir}/{uid}", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.uid, self.uid_lock = uid, fd
            return
        raise OSError(f"all task uids {_UID_BASE}..{_UID_BASE + _UID_COUNT - 1} are taken")

    def probe(self) -> Result:
        """Run the probe program in a task child, the way a real task runs (the probe is no task's data)."""
        task = self.fork_task()
        job_r, job_w = os.pipe()
        result_r, result_w = os.pipe()
        _write_all(job_w, json.dumps({"program": self.probe_program, "inputs": [""]}).encode())
        os.close(job_w)
        self.hand(task, [job_r, result_w], 1)
        self.supervise(task, 1)
        buf = _drain(result_r)
        os.close(result_r)
        _kill_task(task.pid)  # if the deadline passed
        setup = self.setup_failure(task)
        self.finish(task)
        try:
            frames, _ = _split_frames(buf)
        except ValueError:
            frames = []
        if setup:
            return Result("internal", None, setup.decode(errors="replace"))
        return _checked(frames[0], self.cfg["max_output_chars"]) if frames else Result("crash", None, "no result")

    # -- the child: forked before its job arrives, it confines itself, then waits for the job's pipes --
    def child(self, sock, task_dir, as_limit):
        """Always ends in os._exit. Everything before the job's pipes arrive is the same for every task (all
        but the CPU limit, set for the job's input count), so it runs before: a task pays for its pipe hops
        and the program."""
        setup_error = None
        try:
            self.confine(sock, task_dir, as_limit)
        except BaseException as e:  # setup failed: never run the program unconfined
            setup_error = _setup_failed(e)
        else:
            # A fork copies each page on the first write to it. A fixed warm-up call takes most of the copies
            # the real call needs (parser, compiler, json) before the job arrives, off the task's clock.
            self.call("def f(x):\n    return [x, {'k': (x,)}]", "1")
        try:
            s = _socket(sock)
            if setup_error is None:
                msg, (job_r, result_w), _, _ = socket.recv_fds(s, 8, 2)
                (n,) = struct.unpack("<I", msg)
                try:  # CPU time: timeout + 1 s per input, the backstop behind the wall clock (SIGXCPU: timeout)
                    _limit(resource.RLIMIT_CPU, self.cpu * n, self.cpu * n + 1)
                except BaseException as e:
                    setup_error = _setup_failed(e)
            if setup_error is not None:  # to the zygote, which puts it in the job's verdict: a result frame
                s.send(setup_error.encode()[:_ERROR_CAP])  # could be forged by a program, this socket cannot
                os._exit(0)
            s.close()  # before any program code: the program has no way to the zygote
        except BaseException:  # the zygote is gone: nobody to answer
            os._exit(0)
        try:
            data = b""
            while chunk := os.read(job_r, 1 << 20):
                data += chunk
            os.close(job_r)
            job = json.loads(data)
            for inputs in job["inputs"]:
                frame = self.call(job["program"], inputs)
                frame["error"] = frame["error"] and frame["error"][:_ERROR_CAP]
                _write_all(result_w, _frame(frame))
        finally:
            os._exit(0)

    def confine(self, sock, task_dir, as_limit):
        os.setsid()
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != self.pid:
            os._exit(1)
        # A /dev/null of its own (reopened through /proc: a private root has no /dev), not a dup of the zygote's:
        # file status flags (O_NONBLOCK, O_APPEND) live in the open file, which would carry them to later tasks.
        null = os.open(f"/proc/self/fd/{self.devnull}", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, sock)
        os.closerange(sock + 1, 1 << 20)
        os.chdir(task_dir)
        os.umask(0o077)
        for res, soft, hard in ((resource.RLIMIT_AS, as_limit, as_limit), (resource.RLIMIT_NOFILE, 64, 64),
                                (resource.RLIMIT_FSIZE, 8 << 20, 8 << 20), (resource.RLIMIT_CORE, 0, 0),
                                (resource.RLIMIT_CPU, self.cpu, self.cpu * _MAX_BATCH + 1)):  # set per job
            _limit(res, soft, hard)
        if "uid" in self.layers:
            # threads and processes of this uid, machine-wide: the uid is this zygote's alone (claim_uid)
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
        """SPEC rules 3-4 inside the sandbox: parse inputs, run the program, f(*args), repr, re-parse. The
        program runs afresh (a new module) for every input of a job."""
        try:
            try:
                args, kwargs = parse_args(inputs)
            except ValueError as e:
                return {"status": "error", "value": None, "error": f"InvalidInput: {e}"}
            module = types.ModuleType("__main__")  # a real module: dataclasses and typing look it up
            sys.modules["__main__"] = module
            if self.compiled[0] is not program:  # compile once per job, not per input
                self.compiled = (program, compile(program, "<program>", "exec"))
            exec(self.compiled[1], module.__dict__)
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
            return {"status": "error", "value": None, "error": f"{type(e).__name__}: {msg}"}

    # -- the zygote side of one task: it handles the task's file descriptors, never its bytes --
    def fork_task(self) -> _Task:
        """Fork the child for the next task, before the task is known (see `child`), in a fresh directory:
        with a private root, a tmpfs of its own (size-capped, removed whole by one unmount, and a different
        file system from everything else, so not even a hard link leads out of it)."""
        self.serial += 1
        task_dir = os.path.join(self.task_root, str(self.serial))
        os.mkdir(task_dir, 0o700)
        if self.task_root == "/task":
            owner = f",uid={self.uid},gid={self.uid}" if "uid" in self.layers else ""
            _mount("tmpfs", task_dir, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"mode=0700{owner},{_TASK_FS}")
        elif "uid" in self.layers:
            os.chown(task_dir, self.uid, self.uid)
        as_limit = int(_read_proc("/proc/self/statm").split()[0]) * self.page_size + (self.cfg["memory_mb"] << 20)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours, theirs = ours.detach(), theirs.detach()  # raw fds: no socket object to close them at a GC later
        pid = os.fork()
        if pid == 0:
            self.child(theirs, task_dir, as_limit)
        os.close(theirs)
        return _Task(pid, ours, task_dir)

    def hand(self, task, fds, n):
        """Pass the job's pipes (job to read, results to write) to the waiting child and keep no copy: the
        zygote never reads a job or a result, so no fork of it inherits one."""
        s = _socket(task.sock)
        try:
            socket.send_fds(s, [struct.pack("<I", n)], fds)
        except OSError:
            pass  # the child died before (setup failed): `setup_failure` tells why
        finally:
            s.detach()  # the socket stays open: `setup_failure` reads it, `finish` closes it
        for fd in fds:
            os.close(fd)

    @staticmethod
    def setup_failure(task) -> bytes:
        """Why the child could not confine itself (empty if it did): its one message before it exits."""
        try:
            return os.read(task.sock, _ERROR_CAP) if select.select([task.sock], [], [], 0)[0] else b""
        except OSError:
            return b""

    def supervise(self, task, n) -> bool:
        """Wait for the child's exit, its deadline (n inputs x timeout: the trainer times each input), or any
        message or EOF from the trainer, which then has all it wants from this task (or is gone). True when the
        deadline passed."""
        poller = select.poll()
        for fd in (task.pidfd, 0):
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + n * self.cfg["timeout"]
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            if poller.poll(remaining * 1000):
                return False

    def finish(self, task, spare=None):
        """Kill the task's process group, reap it, sweep its escapees (not the next task's child), remove its
        dir."""
        os.close(task.sock)
        _kill_task(task.pid)
        os.close(task.pidfd)
        _sweep(keep=spare.pid if spare else None)
        if self.task_root == "/task":
            _libc.umount2(task.task_dir.encode(), MNT_DETACH)  # everything the task wrote, at once
            try:
                os.rmdir(task.task_dir)
            except OSError:
                pass
        else:
            _remove_tree(task.task_dir)

    def serve(self):
        """Trainer requests, one at a time: b"j" + the input count with the job's two pipes; anything else (b"k",
        sent once the trainer has what it wants from a job) only ends the running child, if it still runs.
        The next job's child is forked while this one runs, so it is confined by the time its job comes, when
        the layers keep a task from reaching another task's child and dir (`isolated`); otherwise only once
        this one is cleaned up. A spare child left unused for _IDLE_S is retired, so an idle zygote holds no
        child and no task dir."""
        spare = None
        while True:
            if spare is not None and not select.select([0], [], [], _IDLE_S)[0]:
                self.finish(spare)
                spare = None
                continue
            try:
                msg, fds, _, _ = socket.recv_fds(self.ctl, 16, 2)
            except OSError:
                msg, fds = b"", []
            if not msg:  # EOF: the trainer closed the executor or died
                if spare is not None:
                    self.finish(spare)
                return
            if msg[:1] != b"j" or len(msg) != 5 or len(fds) != 2:
                for fd in fds:
                    os.close(fd)
                continue
            (n,) = struct.unpack("<I", msg[1:])
            task = spare or self.fork_task()
            self.hand(task, fds, n)
            spare = self.fork_task() if self.isolated else None
            timed_out = self.supervise(task, n)
            status = _kill_task(task.pid)
            try:  # the verdict: what the trainer needs when the task's results stop short
                self.ctl.send(struct.pack("<Bi", timed_out, status) + self.setup_failure(task))
            except OSError:
                pass  # the trainer is gone: the next recv says so
            self.finish(task, spare)
            spare = spare or self.fork_task()


def _socket(fd) -> socket.socket:
    """A socket object owning `fd`, one end of a SOCK_SEQPACKET pair (given, so no getsockopt calls)."""
    return socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=fd)


def _probe_program(read_dirs) -> str:
    """A task that writes and reads its dir and imports stdlib modules the zygote did not load: a pure one and,
    where the stdlib has it as a file, an extension that loads a system library (zlib -> libz)."""
    zlib = any(name.startswith("zlib.") and name.endswith(".so") for d in read_dirs if d.endswith("lib-dynload")
               for name in os.listdir(d))
    return ("import colorsys\n" + ("import zlib\n" if zlib else "") +
            "def f():\n"
            "    with open('probe.txt', 'w') as fh:\n"
            "        fh.write('ok')\n"
            "    return open('probe.txt').read() + str(len(colorsys.__name__))\n")


def _setup_failed(e) -> str:
    return f"Internal: sandbox setup failed: {type(e).__name__}: {e}"


def _limit(res, soft, hard):
    """setrlimit, never above a hard limit the zygote itself was given."""
    old_hard = resource.getrlimit(res)[1]
    if old_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, old_hard), min(hard, old_hard)
    resource.setrlimit(res, (soft, hard))


def _kill_task(pid: int) -> int:
    """SIGKILL the task's process group and the task itself; reap it and return its wait status."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:  # reaped already (finish after the verdict's kill)
        return 0


def _remove_tree(path: str):
    """Remove a tree a task built; never raises, never follows a symlink. Iterative and by fd, one level open
    at a time (a task may nest dirs far past the recursion limit and PATH_MAX), linear in the tree's size,
    making dirs the task locked searchable again. Runs once the task's processes are dead, so nothing changes
    underfoot; each step up is checked against the inode it came down from all the same."""
    try:
        os.rmdir(path)  # most tasks write no files
        return
    except OSError:
        pass
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError:
        return
    levels = []  # per level below `path`: (name in its parent, the parent's (dev, ino), subdirs left to visit)
    subdirs = None
    while True:
        if subdirs is None:
            subdirs = []
            try:
                with os.scandir(fd) as entries:
                    for e in entries:
                        if e.is_dir(follow_symlinks=False):
                            subdirs.append(e.name)
                        else:
                            try:
                                os.unlink(e.name, dir_fd=fd)
                            except OSError:
                                pass
            except OSError:
                pass
        if subdirs:
            name = subdirs.pop()
            try:
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except PermissionError:  # a task chmod-ed it 000 (where it may): the owner may undo that
                    os.chmod(name, 0o700, dir_fd=fd)
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                continue
            st = os.fstat(fd)
            levels.append((name, (st.st_dev, st.st_ino), subdirs))
            os.close(fd)
            fd, subdirs = child, None
            continue
        if not levels:
            break
        name, parent_id, subdirs = levels.pop()
        try:
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
        except OSError:
            break
        os.close(fd)
        fd = parent
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != parent_id:
            break  # moved under us: stop rather than remove anything outside the tree
        try:
            os.rmdir(name, dir_fd=fd)
        except OSError:
            pass
    os.close(fd)
    try:
        os.rmdir(path)
    except OSError:
        pass


def _sweep(keep: int | None = None):
    """Kill and reap every process re-parented to the zygote (a child subreaper, or PID 1 of its namespace),
    generation by generation; all its children are tasks' descendants but `keep`, the next task's child."""
    for _ in range(1000):
        try:
            kids = [int(k) for k in _read_proc("/proc/thread-self/children").split()]
        except FileNotFoundError:  # kernel without CONFIG_PROC_CHILDREN: scan /proc
            me = os.getpid()
            kids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == me]
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
    zygote = _Zygote(cfg)
    refused = zygote.enter_namespaces()  # from here on this is the zygote: PID 1 of its namespace, if any
    for name in _PREIMPORTS:
        __import__(name)
    import gc
    assert "threading" not in sys.modules, "its at-fork hook would slow every task: see the imports at the top"
    sys.set_int_max_str_digits(4300)  # the same everywhere: it decides which big-int reprs fail
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    refused = refused or zygote.detect_layers()
    missing = [name for name in cfg["required"] if name not in zygote.layers]
    if missing:  # the executor's first zygote had them: never run tasks with fewer layers than it did
        refused = "required layers unavailable (" + "; ".join(
            f"{name}: {zygote.skipped.get(name, 'not requested')}" for name in missing) + ")"
    if refused:
        zygote.ctl.send(json.dumps({"refused": refused}).encode())
        os._exit(0)
    gc.collect()
    gc.freeze()  # keep pre-imported objects' pages shared between forks
    zygote.ctl.send(json.dumps({"layers": zygote.layers, "skipped": zygote.skipped, "uid": zygote.uid,
                                "clock": zygote.clock}).encode())
    zygote.serve()
    os._exit(0)
# ---------------------------------------------------------------------------------------------------------
# Trainer side.

LAYERS = ("netns", "pidns", "mountns", "uid", "nocaps", "landlock", "seccomp")
_GRACE_S = 0.25  # the trainer's per-input clock waits this much past the timeout for the zygote's own verdict


class _ZygoteProcess:
    """One zygote as seen by the trainer; restarted lazily after it dies or misbehaves. Talks to it over a
    SOCK_SEQPACKET socket: sends b"j" + the number of inputs with a job's two pipes attached, reads one
    verdict per job (when the task child ended and how). The trainer writes the job into its pipe and reads
    the results from the other itself, as the child writes them."""

    def __init__(self, index, hashseed, cfg):
        self.index, self.hashseed, self.cfg = index, hashseed, cfg
        self.proc = self.ctl = self.base_dir = self.hello = None
        self.starts = 0
        self.pending = 0  # verdicts of earlier jobs still to come (results are returned before them)

    def start(self):
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # tmpfs: ~20 us per task dir, not ~10 ms
        self.base_dir = tempfile.mkdtemp(prefix="azr-exec-", dir=shm)
        os.chmod(self.base_dir, 0o711)
        # The determinism zygote differs in what a cheating program could read: hash seed (and so heap layout
        # and `random`), monotonic and boot clocks (a time namespace), local time zone (13.5 h east).
        canonical = self.hashseed == 0
        cfg = dict(self.cfg, hashseed=self.hashseed, base_dir=self.base_dir, clock_offset=not canonical)
        env = {"PYTHONHASHSEED": str(self.hashseed), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "TZ": "UTC0" if canonical else "<+1330>-13:30"}
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-s", "-S", "-P", os.path.abspath(__file__), "--zygote", json.dumps(cfg)],
                stdin=theirs, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd="/",
                start_new_session=True, close_fds=True)
        finally:
            theirs.close()
        self.ctl, self.pending = ours, 0
        self.starts += 1
        try:
            self.hello = json.loads(self.recv(time.monotonic() + 60))
        except (OSError, EOFError, ValueError) as e:
            self.stop()
            raise RuntimeError(f"executor zygote failed to start ({e}); run `{sys.executable} -s -S -P "
                               f"{os.path.abspath(__file__)} --zygote '{{...}}'` by hand to see why") from None
        if "refused" in self.hello:
            self.stop()
            log.warning("executor: zygote %d refused to start: %s", self.index, self.hello["refused"])
            raise RuntimeError(f"executor zygote refused to start: {self.hello['refused']}")
        if "mountns" in self.hello["layers"]:  # only the mount point of its root until pivot_root: remove it now,
            os.rmdir(self.base_dir)            # so that even a trainer that dies leaves nothing on /dev/shm
        if not canonical and self.hello["clock"] != "offset":
            log.warning("executor: determinism zygote %d runs without a clock offset: %s", self.index,
                        self.hello["clock"])

    def recv(self, deadline) -> bytes:
        if not select.select([self.ctl], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise TimeoutError("no reply from zygote")
        msg = self.ctl.recv(1 << 16)
        if not msg:
            raise EOFError("zygote closed its socket")
        return msg

    def call(self, program, inputs: list[str]) -> list[Result]:
        """f on every input, in order, each with its own timeout and Result. Inputs run one after another in
        one task child; an input that ends its child (timeout, crash) gets that status and the inputs after
        it continue in a fresh child, so one input's failure never changes another's result."""
        results = []
        while len(results) < len(inputs):
            if self.proc is None or self.proc.poll() is not None:
                if self.starts:
                    log.warning("executor: zygote %d restarting (its last one exited with %s)", self.index,
                                None if self.proc is None else self.proc.returncode)
                self.stop()
                self.start()
            try:
                results += self.job(program, inputs[len(results):len(results) + _MAX_BATCH])
            except (OSError, EOFError, TimeoutError) as e:
                self.stop()
                lost = Result("internal", None, f"Internal: zygote lost ({type(e).__name__}: {e})")
                return results + [lost] * (len(inputs) - len(results))
            except BaseException:  # e.g. KeyboardInterrupt mid-job: its verdict would be taken for the next job's
                self.stop()
                raise
        return results

    def job(self, program, inputs) -> list[Result]:
        """One task child for `inputs`: results for a prefix of them, at least one."""
        data = json.dumps({"program": program, "inputs": inputs}).encode()
        if len(data) > _JOB_CAP:
            return [Result("error", None, f"InvalidInput: program and inputs take {len(data)} bytes, "
                                          f"over the {_JOB_CAP} cap")] * len(inputs)
        job_r, job_w = os.pipe()
        result_r, result_w = os.pipe()
        try:
            if len(data) > 1 << 16:
                fcntl.fcntl(job_w, fcntl.F_SETPIPE_SZ, len(data))
            _write_all(job_w, data)  # fits: the child reads it whenever it is ready
            os.close(job_w)
            job_w = None
            socket.send_fds(self.ctl, [b"j" + struct.pack("<I", len(inputs))], [job_r, result_w])
        finally:
            for fd in (job_r, result_w, job_w):
                if fd is not None:
                    os.close(fd)
        try:
            return self.collect(result_r, len(inputs))
        finally:
            os.close(result_r)

    def collect(self, result_r, n) -> list[Result]:
        """Read result frames as the child writes them, timing each input from the previous frame; stop at n
        frames, the child's verdict, an input over its time, or a frame over the cap. Unless the verdict came,
        tell the zygote to end the child and read its verdict later (`pending`): results never wait for it."""
        timeout = self.cfg["timeout"]
        poller = select.poll()
        for fd in (result_r, self.ctl):
            poller.register(fd, select.POLLIN)
        frames, buf, verdict, failure = [], b"", None, None
        now = time.monotonic()
        input_deadline, backstop = now + timeout + _GRACE_S, now + n * timeout + 30
        while len(frames) < n and verdict is None and failure is None:
            now = time.monotonic()
            if now >= backstop:
                raise TimeoutError("no verdict from zygote")
            if now >= input_deadline:
                failure = Result("timeout", None, f"Timeout: over {timeout} s")
                break
            for fd, _ in poller.poll((min(input_deadline, backstop) - now) * 1000):
                if fd == result_r:
                    chunk = os.read(result_r, _FRAME_CAP)
                    if not chunk:  # every writer is gone: the verdict says why the frames stopped
                        poller.unregister(result_r)
                        continue
                    try:
                        got, buf = _split_frames(buf + chunk)
                    except ValueError as e:
                        failure = Result("crash", None, f"Crash: {e}")
                        break
                    if got:
                        frames += got
                        input_deadline = time.monotonic() + timeout + _GRACE_S
                else:
                    msg = self.recv(backstop)
                    if self.pending:
                        self.pending -= 1  # an earlier job's child, ended
                    else:
                        verdict = (*struct.unpack("<Bi", msg[:5]), msg[5:])
        if verdict is not None and len(frames) < n and failure is None:
            buf += _drain(result_r)  # what the child wrote before it ended is all in the pipe
            try:
                frames += _split_frames(buf)[0]
            except ValueError as e:
                failure = Result("crash", None, f"Crash: {e}")
        if verdict is None:  # end the child now (a program that forged its frames may still be running)
            self.pending += 1
            self.ctl.send(b"k")
        results = [_checked(f, self.cfg["max_output_chars"]) for f in frames[:n]]
        if len(results) < n:
            results.append(failure or self.verdict_result(*verdict))
        return results

    def verdict_result(self, timed_out, status, setup_failure) -> Result:
        if setup_failure:
            return Result("internal", None, setup_failure.decode(errors="replace"))
        if timed_out:
            return Result("timeout", None, f"Timeout: over {self.cfg['timeout']} s")
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig == signal.SIGXCPU:
                return Result("timeout", None, "Timeout: CPU time limit")
            try:
                name = signal.Signals(sig).name
            except ValueError:  # a real-time signal (a task can send itself one with a timer) has no name
                name = f"signal {sig}"
            return Result("crash", None, f"Crash: killed by {name}")
        return Result("crash", None, f"Crash: exited with status {os.WEXITSTATUS(status)} without a result")

    def stop(self):
        """Never raises: EOF on its socket makes the zygote end its task and exit (and, as PID 1 of its
        namespace, take every process left in it along); its private mounts go with it."""
        if self.proc is not None:
            self.ctl.close()
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self.base_dir is not None:
            _remove_tree(self.base_dir)  # without a private root: what a dead zygote left
            self.base_dir = None


class _Slot:
    def __init__(self, index, cfg):
        self.canonical = _ZygoteProcess(2 * index, 0, cfg)
        self.probe = _ZygoteProcess(2 * index + 1, 1, cfg)  # started on first determinism check

    def run(self, program, inputs, check_determinism) -> list[Result]:
        try:
            return self.checked_run(program, inputs, check_determinism)
        except Exception as e:  # e.g. a zygote that cannot restart: this job only
            return [Result("internal", None, f"Internal: {type(e).__name__}: {e}")] * len(inputs)

    def checked_run(self, program, inputs, check_determinism) -> list[Result]:
        """SPEC rule 5: every input that ran `ok` runs again in the determinism zygote, each alone in a task
        child of its own, so an output that depends on the inputs run before it in the same process (state
        left in a module, builtins) differs too."""
        first = self.canonical.call(program, inputs)
        ok = [i for i, r in enumerate(first) if r.status == "ok"]
        if not check_determinism or not ok:
            return first
        out = list(first)
        for i in ok:
            (r,) = self.probe.call(program, [inputs[i]])
            if r.status == "internal":
                out[i] = r
            elif r.status != "ok" or not values_equal(parse_value(first[i].value), parse_value(r.value)):
                got = r.value if r.status == "ok" else f"{r.status} ({r.error})"
                out[i] = Result("error", None, f"Nondeterministic: {first[i].value[:200]} then {got[:200]} in a "
                                               f"second run (another hash seed, clocks, time zone, process)")
        return out


class Executor:
    """Runs `f(*args, **kwargs)` of model-written programs in sandboxed forks of `workers` zygotes.

    `unsafe=True` lets a root trainer run tasks without the uid layer (as root without capabilities), where
    this machine cannot give them an unprivileged uid; without it the executor refuses to start."""

    def __init__(self, workers: int = os.cpu_count() or 1, timeout: float = 10.0, memory_mb: int = 1024,
                 max_output_chars: int = 400, layers: tuple[str, ...] = LAYERS, unsafe: bool = False):
        if workers < 1 or timeout <= 0 or memory_mb < 16 or max_output_chars < 1:
            raise ValueError("Executor needs workers >= 1, timeout > 0, memory_mb >= 16, max_output_chars >= 1")
        unknown = set(layers) - set(LAYERS)
        if unknown:
            raise ValueError(f"unknown executor layers {sorted(unknown)}; choose from {LAYERS}")
        root = os.geteuid() == 0
        if root and "uid" not in layers and not unsafe:
            raise ValueError("Executor: without the 'uid' layer a root trainer's tasks run as root (without "
                             "capabilities, still owning every root-owned file); add 'uid' or pass unsafe=True")
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
                    hello = slot.canonical.hello
                    if root and "uid" not in hello["layers"] and not unsafe:
                        raise RuntimeError(f"Executor: tasks cannot drop to an unprivileged uid here "
                                           f"({hello['skipped'].get('uid')}), so they would run as root without "
                                           f"capabilities; fix that or pass unsafe=True")
                self._free.put(slot)
        except BaseException:
            self.close()
            raise
        self.layers, self.skipped = tuple(hello["layers"]), dict(hello["skipped"])
        log.info("executor: %d workers, layers active: %s", workers, ", ".join(self.layers) or "none")
        for name, why in hello["skipped"].items():
            log.info("executor: layer %s skipped: %s", name, why)

    @staticmethod
    def _check_job(job):
        program, inputs = job if isinstance(job, (tuple, list)) and len(job) == 2 else (None, None)
        if not (isinstance(program, str) and (isinstance(inputs, str) or isinstance(inputs, (list, tuple))
                                              and all(isinstance(i, str) for i in inputs))):
            raise TypeError("a job is (program: str, inputs: str or list of str)")

    def run(self, program: str, inputs: str | list[str]) -> Result | list[Result]:
        """f(*inputs): a Result; for a list of input texts, a list of Results, one per input, in order."""
        self._check_job((program, inputs))
        slot = self._free.get()
        try:
            return self._run_on(slot, program, inputs, False)
        finally:
            self._free.put(slot)

    @staticmethod
    def _run_on(slot, program, inputs, check_determinism):
        one = isinstance(inputs, str)
        rs = slot.run(program, [inputs] if one else list(inputs), check_determinism)
        return rs[0] if one else rs

    def run_batch(self, jobs: list[tuple[str, str | list[str]]], check_determinism: bool = False
                  ) -> list[Result | list[Result]]:
        """One entry per job, in order: a Result for `(program, inputs)`, a list of Results for `(program,
        [inputs, ...])`, whose inputs run in one task child (each still timed alone: see `_ZygoteProcess.call`).
        Jobs are spread over the workers."""
        for job in jobs:
            self._check_job(job)
        results: list = [None] * len(jobs)
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
                    results[i] = self._run_on(slot, *jobs[i], check_determinism)
            finally:
                self._free.put(slot)

        threads = [threading.Thread(target=drain, daemon=True) for _ in range(min(len(self.slots), len(jobs)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    def close(self):
        """Never raises; afterwards no zygote, task or task dir of this executor is left."""
        for slot in self.slots:
            for zygote in (slot.canonical, slot.probe):
                try:
                    zygote.stop()
                except Exception as e:  # noqa: BLE001 (log and go on: the others must still stop)
                    log.warning("executor: stopping zygote %d: %s", zygote.index, e)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__" and sys.argv[1:2] == ["--zygote"]:
    _zygote_main(sys.argv[2])
