"""An emulator of the PTX that Triton emits for sm_90: one thread block (CTA) at a time, its threads in lock-step
as numpy vectors, with a checker of what lock-step hides on a GPU.

It covers the instructions Triton 3.6 emits for the TTT kernels (integer and float arithmetic, global, shared and
param loads and stores, shuffles, bar.sync, cp.async, ldmatrix/stmatrix, mma.sync tf32/bf16, wgmma tf32 with A in
registers and B from a swizzled shared-memory descriptor) and raises NotImplementedError on any other. Threads
that branch apart run by min-PC scheduling and join again where the code joins. Shared memory starts filled with
NaN bytes (as a GPU's holds leftovers). The checker reports, per instruction:
  RAW / WAR / WAW: two warps touch the same bytes (shared or global) with no bar.sync between, one of them writing;
  uninitialised-read: shared memory read before anything wrote it;
  read-before-cp.async-wait: cp.async data read before the copying thread waited for it;
  write-during-wgmma: shared memory written while a wgmma may still read it.
What it cannot see: the machine code (ptxas's output), and races between thread blocks (they run one by one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

INT_TYPES = {"u16": np.uint16, "s16": np.int16, "b16": np.uint16, "u32": np.uint32, "s32": np.int32,
             "b32": np.uint32, "u64": np.uint64, "s64": np.int64, "b64": np.uint64, "pred": bool}


def bf16_to_f32(h):
    return (np.asarray(h, dtype=np.uint32) << 16).view(np.float32)


def f32_to_bf16(x):
    """Round to nearest even, as cvt.rn.bf16.f32."""
    x = np.asarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), r)


def tf32(x):
    """The tf32 operand the tensor cores take from a float32 (low 13 mantissa bits dropped)."""
    return (np.asarray(x, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def _split_args(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()] if cur.strip() else out


def _names(group: str) -> list[str]:
    return [x.strip() for x in group.strip("{} ").split(",")]


@dataclass
class Inst:
    line: int  # in the PTX text
    loc: str  # the source line it came from, as the PTX's .loc comment gives it
    pred: str | None
    neg: bool
    op: str
    args: list
    text: str


class Heap:
    """Global memory: one byte array; addresses start at BASE."""

    BASE = 1 << 32

    def __init__(self):
        self.buf = np.zeros(0, dtype=np.uint8)

    def alloc(self, raw: np.ndarray) -> int:
        """Copy the bytes `raw` in (256-byte aligned, with a gap after); returns their address."""
        off = (len(self.buf) + 255) // 256 * 256
        new = np.zeros(off + max(len(raw), 1) + 256, dtype=np.uint8)
        new[: len(self.buf)] = self.buf
        new[off : off + len(raw)] = raw
        self.buf = new
        return self.BASE + off


class Shadow:
    """What the checker keeps per 2 bytes of a memory: the last write's barrier epoch and warp, the warps that
    read in the current epoch, a pending cp.async, and whether a wgmma in flight reads them."""

    def __init__(self, nbytes: int, what: str):
        n = (nbytes + 1) // 2
        self.w_epoch = np.full(n, -1, np.int64)
        self.w_warp = np.full(n, -1, np.int16)
        self.r_epoch = np.full(n, -1, np.int64)
        self.r_mask = np.zeros(n, np.uint32)
        self.pending = np.zeros(n, bool)
        self.inflight = np.zeros(n, bool)
        self.what = what


class Emulator:
    def __init__(self, ptx: str):
        self.reqntid = int(re.search(r"\.reqntid (\d+)", ptx).group(1))
        self.params = re.findall(r"\.param \.\w+(?: \.ptr \.global \.align \d+)? (\w+)", ptx)
        self._parse(ptx)
        self.nt = self.reqntid

    def _parse(self, ptx: str):
        lines = ptx.split("\n")
        start = next(i for i, ln in enumerate(lines) if ln.startswith(".visible .entry"))
        body = next(i for i in range(start, len(lines)) if lines[i].strip() == "{")
        self.insts, self.labels, loc = [], {}, ""
        for i in range(body + 1, len(lines)):
            s = lines[i].strip()
            if s == "}":
                break
            if s.startswith(".loc"):
                loc = s[s.find("//") + 2 :].strip() if "//" in s else s
                continue
            s = s.split("//")[0].strip()
            if not s or s.startswith(".reg"):
                continue
            if s.endswith(":") and " " not in s:
                self.labels[s[:-1]] = len(self.insts)
                continue
            s = s.rstrip(";").strip()
            pred, neg = None, False
            m = re.match(r"@(!?)(%p\d+)\s+(.*)", s)
            if m:
                neg, pred, s = m.group(1) == "!", m.group(2), m.group(3)
            op, _, rest = s.partition(" ")
            self.insts.append(Inst(i + 1, loc, pred, neg, op, _split_args(rest), s))

    # ---------------------------------------------------------------------------------------------- running
    def run(self, params: dict, heap: Heap, ctaid: int, smem_bytes: int, findings: list):
        """Run program `ctaid` to its end. params: PTX parameter name -> value (an address or the bits of a
        scalar). Findings (strings) are appended to `findings`, one per kind and instruction."""
        self.R, self.ctaid, self.heap, self.pvals, self.findings = {}, ctaid, heap, params, findings
        self.smem = np.full(smem_bytes + 1024, 0xFF, np.uint8)
        self.sh = {"shared": Shadow(len(self.smem), "shared"), "global": Shadow(len(heap.buf), "global")}
        self.epoch = 0
        self.cp_groups = {w: [[]] for w in range(self.nt // 32)}  # per warp: committed groups, then the open one
        self.wgmma_units = []
        pc = np.zeros(self.nt, np.int64)
        done = np.zeros(self.nt, bool)
        while not done.all():
            cur = pc[~done].min()
            mask = (pc == cur) & ~done
            inst = self.insts[cur]
            active = mask
            if inst.pred is not None:
                p = self.reg(inst.pred)
                active = mask & (~p if inst.neg else p)
            handler = getattr(self, "op_" + inst.op.split(".")[0], None)
            if handler is None:
                raise NotImplementedError(f"PTX line {inst.line}: {inst.text}")
            res = handler(inst, active, mask)
            if res is None:
                pc[mask] += 1
            elif res == "ret":
                done |= active
                pc[mask & ~active] += 1
            else:
                pc[active] = self.labels[res]
                pc[mask & ~active] += 1
            done |= pc >= len(self.insts)

    def report(self, kind: str, inst: Inst, detail: str):
        head = f"{kind} at PTX line {inst.line} ({inst.loc})"
        if not any(f.startswith(head) for f in self.findings):
            self.findings.append(f"{head}: {inst.text[:80]} -- {detail}")

    # ---------------------------------------------------------------------------------------------- registers
    def reg(self, name: str) -> np.ndarray:
        r = self.R.get(name)
        if r is None:
            kind = bool if name.startswith("%p") else np.uint64 if name.startswith("%rd") else \
                np.uint16 if name.startswith("%rs") else np.uint32
            r = self.R[name] = np.zeros(self.nt, kind)
        return r

    def typed(self, a: str, t: str) -> np.ndarray:
        """Operand a (register, special register, symbol or immediate) as an array of PTX type t."""
        if t == "f32":
            if a.startswith("0f"):
                return np.full(self.nt, int(a[2:], 16), np.uint32).view(np.float32)
            if not a.startswith("%"):
                return np.full(self.nt, float(a), np.float32)
            return self.typed(a, "b32").view(np.float32)
        dt = INT_TYPES[t]
        if a == "%tid.x":
            v = np.arange(self.nt, dtype=np.uint32)
        elif a == "%ctaid.x":
            v = np.full(self.nt, self.ctaid, np.uint32)
        elif a in ("%ctaid.y", "%ctaid.z", "global_smem"):
            v = np.zeros(self.nt, np.uint32)  # shared addresses start at 0
        elif a.startswith("%"):
            v = self.reg(a)
        else:  # 0f/0d: the bits of a float literal
            bits = int(a[2:], 16) if a[:2] in ("0f", "0d") else int(a, 0)
            return np.full(self.nt, bits, np.int64 if bits < 1 << 63 else np.uint64).astype(dt)
        if v.dtype == dt:
            return v
        if dt is bool or v.dtype == bool:
            return v.astype(dt)
        return v.view(dt) if v.dtype.itemsize == np.dtype(dt).itemsize else v.astype(dt)

    def write(self, name: str, value, mask):
        r = self.reg(name)
        value = np.asarray(value)
        if value.dtype != r.dtype:
            value = value.view(r.dtype) if value.dtype.itemsize == r.dtype.itemsize and r.dtype != bool \
                else value.astype(r.dtype)
        r[mask] = value[mask]

    # ---------------------------------------------------------------------------------------------- memory
    def addr(self, a: str) -> np.ndarray:
        m = re.match(r"\[\s*(%?\w+)\s*(?:\+\s*(-?\d+))?\s*\]$", a)
        return self.typed(m.group(1), "s64") + int(m.group(2) or 0)

    def check(self, space: str, units: np.ndarray, warps: np.ndarray, write: bool, inst: Inst):
        """Record accesses of `warps` to `units` (2-byte granules) and report conflicts."""
        sh, E = self.sh[space], self.epoch
        other_w = (sh.w_epoch[units] == E) & (sh.w_warp[units] != warps) & (sh.w_warp[units] >= 0)
        if write:
            if sh.inflight[units].any():
                self.report("write-during-wgmma", inst, f"{space} byte {2 * units[sh.inflight[units]][0]}")
            others = sh.r_mask[units] & ~(np.uint32(1) << warps.astype(np.uint32))
            bad = (sh.r_epoch[units] == E) & (others != 0)
            if bad.any():
                self.report("WAR", inst, f"{space} byte {2 * units[bad][0]} read by another warp since the last "
                            f"bar.sync, written by warp {warps[bad][0]}")
            if other_w.any():
                self.report("WAW", inst, f"{space} byte {2 * units[other_w][0]}")
            sh.w_epoch[units], sh.w_warp[units], sh.pending[units] = E, warps, False
        else:
            if space == "shared" and (sh.w_epoch[units] < 0).any():
                self.report("uninitialised-read", inst, f"shared byte {2 * units[sh.w_epoch[units] < 0][0]}")
            if sh.pending[units].any():
                self.report("read-before-cp.async-wait", inst, f"shared byte {2 * units[sh.pending[units]][0]}")
            if other_w.any():
                u = units[other_w][0]
                self.report("RAW", inst, f"{space} byte {2 * u} written by warp {sh.w_warp[u]} since the last "
                            f"bar.sync, read by warp {warps[other_w][0]}")
            fresh = sh.r_epoch[units] == E
            sh.r_mask[units] = np.where(fresh, sh.r_mask[units], 0) | (np.uint32(1) << warps.astype(np.uint32))
            sh.r_epoch[units] = E

    def access(self, space: str, addrs, size: int, lanes, inst: Inst, data=None):
        """Read (data None; returns [len(lanes), size] bytes) or write `size` bytes at each lane's address."""
        mem, base = (self.smem, 0) if space == "shared" else (self.heap.buf, Heap.BASE)
        off = addrs[lanes] - base
        if len(lanes) and (off.min() < 0 or off.max() + size > len(mem)):
            raise RuntimeError(f"out-of-bounds {space} access at PTX line {inst.line}: {inst.text}")
        n = max(size // 2, 1)
        units = ((off // 2)[:, None] + np.arange(n)).reshape(-1)
        self.check(space, units, np.repeat(lanes // 32, n), data is not None, inst)
        idx = off[:, None] + np.arange(size)
        if data is None:
            return mem[idx]
        mem[idx] = data
        return None

    # ---------------------------------------------------------------------------------------------- instructions
    def op_mov(self, inst, active, mask):
        t = inst.op.split(".")[1]
        d, s = inst.args
        if d.startswith("{"):  # unpack, first name the low bits
            outs = _names(d)
            parts = self.typed(s, t).view(np.uint16 if t == "b32" else np.uint32).reshape(self.nt, len(outs))
            for i, o in enumerate(outs):
                self.write(o, parts[:, i].copy(), active)
        elif s.startswith("{"):  # pack
            half = "b16" if t == "b32" else "b32"
            vals = np.stack([self.typed(x, half) for x in _names(s)], 1).copy()
            self.write(d, vals.view(INT_TYPES[t]).reshape(self.nt), active)
        else:
            self.write(d, self.typed(s, t), active)

    def _arith(self, inst, active, fn):
        t = inst.op.split(".")[-1]
        d, *src = inst.args
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            self.write(d, fn(*(self.typed(x, t) for x in src)), active)

    def op_add(self, inst, active, mask):
        self._arith(inst, active, lambda a, b: a + b)

    def op_sub(self, inst, active, mask):
        self._arith(inst, active, lambda a, b: a - b)

    def op_neg(self, inst, active, mask):
        self._arith(inst, active, lambda a: -a)

    def op_max(self, inst, active, mask):
        self._arith(inst, active, np.maximum)

    def op_ex2(self, inst, active, mask):
        self._arith(inst, active, np.exp2)

    def op_sqrt(self, inst, active, mask):
        self._arith(inst, active, np.sqrt)

    def op_selp(self, inst, active, mask):
        d, a, b, c = inst.args
        t = inst.op.split(".")[-1]
        self.write(d, np.where(self.typed(c, "pred"), self.typed(a, t), self.typed(b, t)), active)

    def op_and(self, inst, active, mask):
        self._arith(inst, active, lambda a, b: a & b)

    def op_or(self, inst, active, mask):
        self._arith(inst, active, lambda a, b: a | b)

    def op_xor(self, inst, active, mask):
        self._arith(inst, active, lambda a, b: a ^ b)

    def op_not(self, inst, active, mask):
        self._arith(inst, active, lambda a: ~a)

    def op_mul(self, inst, active, mask):
        parts = inst.op.split(".")
        t, d, a, b = parts[-1], *inst.args
        if parts[1] == "wide":
            wide = {"u32": np.uint64, "s32": np.int64}[t]
            self.write(d, self.typed(a, t).astype(wide) * self.typed(b, t).astype(wide), active)
        else:
            self._arith(inst, active, lambda x, y: x * y)

    def op_mad(self, inst, active, mask):
        parts = inst.op.split(".")
        t, d, a, b, c = parts[-1], *inst.args
        with np.errstate(over="ignore"):
            if parts[1] == "wide":
                wide, wt = {"u32": (np.uint64, "u64"), "s32": (np.int64, "s64")}[t]
                r = self.typed(a, t).astype(wide) * self.typed(b, t).astype(wide) + self.typed(c, wt)
            else:
                r = self.typed(a, t) * self.typed(b, t) + self.typed(c, t)
        self.write(d, r, active)

    def op_fma(self, inst, active, mask):
        d, a, b, c = inst.args
        a, b, c = (self.typed(x, "f32").astype(np.float64) for x in (a, b, c))
        with np.errstate(over="ignore", invalid="ignore"):
            self.write(d, (a * b + c).astype(np.float32), active)

    def op_div(self, inst, active, mask):
        t = inst.op.split(".")[-1]
        if t == "f32":
            return self._arith(inst, active, lambda a, b: a / b)
        d, a, b = inst.args
        x, y = self.typed(a, t).astype(np.int64), self.typed(b, t).astype(np.int64)
        y = np.where(y == 0, 1, y)
        self.write(d, (np.abs(x) // np.abs(y) * np.sign(x) * np.sign(y)).astype(INT_TYPES[t]), active)

    def op_shl(self, inst, active, mask):
        t, (d, a, b) = inst.op.split(".")[-1], inst.args
        bits = 8 * np.dtype(INT_TYPES[t]).itemsize
        v, n = self.typed(a, t).astype(np.uint64), self.typed(b, "u32").astype(np.uint64)
        r = np.where(n >= bits, np.uint64(0), v << np.minimum(n, np.uint64(63)))
        self.write(d, (r & np.uint64((1 << bits) - 1)).astype(INT_TYPES[t]), active)

    def op_shr(self, inst, active, mask):
        t, (d, a, b) = inst.op.split(".")[-1], inst.args
        v, n = self.typed(a, t), self.typed(b, "u32").astype(np.int64)
        bits = 8 * v.dtype.itemsize
        r = v >> np.minimum(n, bits - 1).astype(v.dtype)
        if not t.startswith("s"):
            r = np.where(n >= bits, 0, r).astype(v.dtype)
        self.write(d, r, active)

    def op_bfe(self, inst, active, mask):
        t, (d, a, b, c) = inst.op.split(".")[-1], inst.args
        bits = 8 * np.dtype(INT_TYPES[t]).itemsize
        v = self.typed(a, t).astype(np.uint64)
        pos, n = self.typed(b, "u32").astype(np.uint64), self.typed(c, "u32").astype(np.uint64)
        r = (v >> pos) & ((np.uint64(1) << n) - np.uint64(1))
        if t.startswith("s"):
            sign = (r >> (n - np.uint64(1))) & np.uint64(1)
            r = np.where(sign == 1, r | (~((np.uint64(1) << n) - np.uint64(1))), r)
        self.write(d, (r & np.uint64((1 << bits) - 1)).astype(INT_TYPES[t]), active)

    def op_setp(self, inst, active, mask):
        _, cmp, t = inst.op.split(".")
        d, a, b = inst.args
        t = "u" + t[1:] if t.startswith("b") else t
        x, y = self.typed(a, t), self.typed(b, t)
        self.write(d, {"lt": x < y, "le": x <= y, "gt": x > y, "ge": x >= y, "eq": x == y, "ne": x != y}[cmp],
                   active)

    def op_cvt(self, inst, active, mask):
        parts = inst.op.split(".")[1:]
        d, *src = inst.args
        if parts == ["f32", "bf16"]:
            r = bf16_to_f32(self.typed(src[0], "b16"))
        elif parts == ["rn", "bf16x2", "f32"]:  # a to the upper half, b to the lower
            hi, lo = (f32_to_bf16(self.typed(x, "f32")).astype(np.uint32) for x in src)
            r = (hi << 16) | lo
        elif parts == ["rn", "bf16", "f32"]:
            r = f32_to_bf16(self.typed(src[0], "f32"))
        elif parts[:2] == ["rn", "f32"]:
            r = self.typed(src[0], parts[2]).astype(np.float32)
        else:
            r = self.typed(src[0], parts[1]).astype(INT_TYPES[parts[0]])
        self.write(d, r, active)

    def op_ld(self, inst, active, mask):
        parts = inst.op.split(".")
        d, a = inst.args
        t = parts[-1]
        if parts[1] == "param":
            name = a.strip("[] ")
            self.write(d, np.full(self.nt, self.pvals[name]).astype(INT_TYPES[t]), active)
            return
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        outs = _names(d)
        lanes = np.nonzero(active)[0]
        if not len(lanes):
            return
        dt = INT_TYPES[t]
        raw = self.access(parts[1], self.addr(a), np.dtype(dt).itemsize * vec, lanes, inst)
        vals = np.zeros((self.nt, vec), dt)
        vals[lanes] = raw.copy().view(dt)
        for i, o in enumerate(outs):
            self.write(o, vals[:, i].copy(), active)

    def op_st(self, inst, active, mask):
        parts = inst.op.split(".")
        a, s = inst.args
        t = parts[-1]
        dt = INT_TYPES[t]
        vals = np.stack([self.typed(x, t) for x in _names(s)], 1).astype(dt)
        lanes = np.nonzero(active)[0]
        if not len(lanes):
            return
        raw = np.ascontiguousarray(vals[lanes]).view(np.uint8).reshape(len(lanes), -1)
        self.access(parts[1], self.addr(a), raw.shape[1], lanes, inst, raw)

    def op_atom(self, inst, active, mask):  # atom.global.gpu.<sem>.add.u32 d, [a], b: one lane at a time
        d, a, b = inst.args
        addrs, inc = self.addr(a), self.typed(b, "u32")
        out = np.zeros(self.nt, np.uint32)
        for ln in np.nonzero(active)[0]:
            cell = self.heap.buf[addrs[ln] - Heap.BASE : addrs[ln] - Heap.BASE + 4].view(np.uint32)
            out[ln] = cell[0]
            cell[0] += inc[ln]
        self.write(d, out, active)

    def op_shfl(self, inst, active, mask):
        mode = inst.op.split(".")[2]
        d, a, b, _c, _m = inst.args
        lane = np.arange(32)[None, :]
        src = self.typed(b, "u32").reshape(-1, 32).astype(np.int64)
        src = lane ^ src if mode == "bfly" else src & 31  # idx with c = 31: the lane b itself
        if mode not in ("bfly", "idx"):
            raise NotImplementedError(inst.text)
        self.write(d, np.take_along_axis(self.typed(a, "b32").reshape(-1, 32), src, 1).reshape(-1), active)

    def op_bra(self, inst, active, mask):
        return inst.args[0]

    def op_ret(self, inst, active, mask):
        return "ret"

    def op_bar(self, inst, active, mask):
        if not mask.all():
            raise RuntimeError(f"bar.sync reached by {mask.sum()} of {self.nt} threads at PTX line {inst.line}")
        self.epoch += 1

    def op_fence(self, inst, active, mask):  # fence.proxy.async: ordering the checker does not model
        pass

    # ---- matrix instructions: fragments per the PTX ISA, g = lane / 4, t = lane % 4
    def _per_warp(self, name: str) -> np.ndarray:
        return self.typed(name, "b32").reshape(-1, 32)

    def op_mma(self, inst, active, mask):
        shape = inst.op.split(".")[3]
        dn, an, bn, cn = (_names(x) for x in inst.args)
        W = self.nt // 32
        g, t = np.arange(32) // 4, np.arange(32) % 4
        if shape == "m16n8k8":  # tf32
            A, B = np.zeros((W, 16, 8)), np.zeros((W, 8, 8))
            a = [tf32(self._per_warp(x).view(np.float32)) for x in an]
            A[:, g, t], A[:, g + 8, t], A[:, g, t + 4], A[:, g + 8, t + 4] = a
            B[:, t, g], B[:, t + 4, g] = (tf32(self._per_warp(x).view(np.float32)) for x in bn)
        elif shape == "m16n8k16":  # bf16, two per register, the lower first
            A, B = np.zeros((W, 16, 16)), np.zeros((W, 16, 8))
            for r, (row, col) in zip(an, ((g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8))):
                v = self._per_warp(r)
                A[:, row, col], A[:, row, col + 1] = bf16_to_f32(v & 0xFFFF), bf16_to_f32(v >> 16)
            for r, row in zip(bn, (2 * t, 2 * t + 8)):
                v = self._per_warp(r)
                B[:, row, g], B[:, row + 1, g] = bf16_to_f32(v & 0xFFFF), bf16_to_f32(v >> 16)
        else:
            raise NotImplementedError(inst.text)
        C = np.zeros((W, 16, 8))
        C[:, g, 2 * t], C[:, g, 2 * t + 1], C[:, g + 8, 2 * t], C[:, g + 8, 2 * t + 1] = (
            self._per_warp(x).view(np.float32) for x in cn)
        with np.errstate(over="ignore", invalid="ignore"):
            D = (A @ B + C).astype(np.float32)
        for name, v in zip(dn, (D[:, g, 2 * t], D[:, g, 2 * t + 1], D[:, g + 8, 2 * t], D[:, g + 8, 2 * t + 1])):
            self.write(name, v.reshape(-1).copy(), active)

    def _matrix_rows(self, inst, active, store: bool):
        """ldmatrix / stmatrix .m8n8.xN.b16: matrix i's row r at the address of lane 8i + r; a lane's register i
        holds row g, columns 2t, 2t+1 of matrix i (transposed: rows 2t, 2t+1 of column g)."""
        if not (self.reg(inst.pred) if inst.pred else np.ones(1, bool)).all():
            raise NotImplementedError("predicated ldmatrix/stmatrix")
        parts = inst.op.split(".")
        x, trans = int(parts[4][1]), "trans" in parts
        regs, a = (inst.args[1], inst.args[0]) if store else inst.args
        names = _names(regs)
        W = self.nt // 32
        rows = self.addr(a).reshape(W, 32)
        g, t = np.arange(32) // 4, np.arange(32) % 4
        warps = np.repeat(np.arange(W), 32)
        for i in range(x):
            r = rows[:, 8 * i : 8 * i + 8]
            e0, e1 = (r[:, 2 * t] + 2 * g, r[:, 2 * t + 1] + 2 * g) if trans else (r[:, g] + 4 * t, r[:, g] + 4 * t + 2)
            e0, e1 = e0.reshape(-1), e1.reshape(-1)
            units = np.concatenate([e0, e1]) // 2
            self.check("shared", units, np.concatenate([warps, warps]), store, inst)
            idx0, idx1 = e0[:, None] + np.arange(2), e1[:, None] + np.arange(2)
            if store:
                v = self.typed(names[i], "b32")
                self.smem[idx0] = (v & 0xFFFF).astype(np.uint16).view(np.uint8).reshape(-1, 2)
                self.smem[idx1] = (v >> 16).astype(np.uint16).view(np.uint8).reshape(-1, 2)
            else:
                lo = self.smem[idx0].copy().view(np.uint16)[:, 0].astype(np.uint32)
                hi = self.smem[idx1].copy().view(np.uint16)[:, 0].astype(np.uint32)
                self.write(names[i], lo | (hi << 16), active)

    def op_ldmatrix(self, inst, active, mask):
        self._matrix_rows(inst, active, store=False)

    def op_stmatrix(self, inst, active, mask):
        self._matrix_rows(inst, active, store=True)

    def op_cp(self, inst, active, mask):
        sh = self.sh["shared"]
        if inst.op.startswith("cp.async.commit_group"):
            for groups in self.cp_groups.values():
                groups.append([])
        elif inst.op.startswith("cp.async.wait_group"):  # all but the newest N committed groups complete
            keep = int(inst.args[0])
            for w, groups in self.cp_groups.items():
                committed = groups[:-1]
                done = committed[: max(len(committed) - keep, 0)]
                for units in (u for grp in done for u in grp):
                    sh.pending[units] = False
                    sh.w_epoch[units], sh.w_warp[units] = self.epoch, w  # other warps need a bar.sync
                self.cp_groups[w] = committed[len(done):] + [groups[-1]]
        else:  # cp.async.cg.shared.global [dst], [src], 16, src_bytes (the rest zero-filled)
            dst, src, size, n = inst.args
            size = int(size, 0)
            da, sa, nb = self.addr(dst), self.addr(src), self.typed(n, "u32").astype(np.int64)
            lanes = np.nonzero(active)[0]
            for ln in lanes:
                chunk = np.zeros(size, np.uint8)
                s0 = sa[ln] - Heap.BASE
                chunk[: nb[ln]] = self.heap.buf[s0 : s0 + nb[ln]]
                self.smem[da[ln] : da[ln] + size] = chunk
            reads = lanes[nb[lanes] > 0]
            if len(reads):
                gu = (((sa[reads] - Heap.BASE) // 2)[:, None] + np.arange(size // 2)).reshape(-1)
                self.check("global", gu, np.repeat(reads // 32, size // 2), False, inst)
            units = ((da[lanes] // 2)[:, None] + np.arange(size // 2)).reshape(-1)
            warps = np.repeat(lanes // 32, size // 2)
            self.check("shared", units, warps, True, inst)
            sh.pending[units] = True
            for w in np.unique(warps):
                self.cp_groups[int(w)][-1].append(units[warps == w])

    def op_wgmma(self, inst, active, mask):
        """wgmma.mma_async.sync.aligned.m64nNk8.f32.tf32.tf32 {d}, {a}, b_desc, scale_d, 1, 1: per warpgroup,
        D[64, N] (+)= A[64, 8] B[8, N]; A from registers (warp w of the group holds rows 16w.., as mma's A), B
        K-major in shared memory at the descriptor's start (bits 0-13, in 16 bytes), rows of N 8 apart by SBO
        (bits 32-45), swizzled per bits 62-63 (1: 128, 2: 64, 3: 32 bytes)."""
        if not inst.op.startswith("wgmma.mma_async"):
            if inst.op.startswith("wgmma.wait_group"):
                for units in self.wgmma_units:
                    self.sh["shared"].inflight[units] = False
                self.wgmma_units = []
            return
        N = int(re.search(r"m64n(\d+)k8", inst.op).group(1))
        d, a, bdesc, scale_d, sa, sb = inst.args
        if "tf32" not in inst.op or (sa, sb) != ("1", "1") or not a.startswith("{"):
            raise NotImplementedError(inst.text)
        dn, an = _names(d), _names(a)
        g, t = np.arange(32) // 4, np.arange(32) % 4
        scale = self.typed(scale_d, "pred") if scale_d.startswith("%") else np.full(self.nt, scale_d != "0")
        out = {name: self.reg(name).copy() for name in dn}
        for wg in range(self.nt // 128):
            sl = slice(128 * wg, 128 * wg + 128)
            desc = np.unique(self.typed(bdesc, "b64")[sl])
            if len(desc) != 1 or len(np.unique(scale[sl])) != 1:
                raise RuntimeError(f"wgmma operands differ within a warpgroup at PTX line {inst.line}")
            desc = int(desc[0])
            width = {1: 128, 2: 64, 3: 32}.get(desc >> 62)
            if width is None or (desc >> 49) & 7:
                raise NotImplementedError(f"wgmma descriptor {desc:#x} (no swizzle or a base offset)")
            start, sbo = (desc & 0x3FFF) << 4, ((desc >> 32) & 0x3FFF) << 4
            n, k = np.arange(N)[:, None], np.arange(8)[None, :]
            lin = start + (n // 8) * sbo + (n % 8) * width + 4 * k
            off = (lin ^ (((lin >> 7) & (width // 16 - 1)) << 4)).reshape(-1)
            B = tf32(self.smem[off[:, None] + np.arange(4)].copy().view(np.float32).reshape(N, 8)).T
            units = np.concatenate([off, off + 2]) // 2
            for w in range(4):
                self.check("shared", units, np.full(len(units), 4 * wg + w), False, inst)
            self.sh["shared"].inflight[units] = True
            self.wgmma_units.append(units)
            A = np.zeros((64, 8))
            av = [tf32(self.typed(x, "b32")[sl].view(np.float32)).reshape(4, 32) for x in an]
            C = np.zeros((64, N))
            cv = [self.typed(x, "b32")[sl].view(np.float32).reshape(4, 32) for x in dn]
            spots = [[(16 * w + g + 8 * (j // 2), 8 * i + 2 * t + j % 2) for i in range(N // 8) for j in range(4)]
                     for w in range(4)]
            for w in range(4):
                r = 16 * w + g
                A[r, t], A[r + 8, t], A[r, t + 4], A[r + 8, t + 4] = (v[w] for v in av)
                for m, (rr, cc) in enumerate(spots[w]):
                    C[rr, cc] = cv[m][w]
            if not scale[sl][0]:
                C[:] = 0
            with np.errstate(over="ignore", invalid="ignore"):
                Dm = (A @ B.astype(np.float64) + C).astype(np.float32)
            for w in range(4):
                for m, (rr, cc) in enumerate(spots[w]):
                    out[dn[m]][128 * wg + 32 * w : 128 * wg + 32 * w + 32] = Dm[rr, cc].view(np.uint32)
        for name, v in out.items():
            self.write(name, v, active)
