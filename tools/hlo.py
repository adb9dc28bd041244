"""Reads compiled (optimized) HLO text: each instruction's shape, operands, fused body, matmul FLOPs and bytes.

Used by step_profile.py (to name and group traced ops) and compiled_cost.py (to count what a step moves).
"""

import math
import re

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b(pred|bf16|f8e\w+|[sufc]\d+)\[([\d,]*)\]")


def _item_bits(dtype: str) -> int:
  return {"pred": 8, "bf16": 16}.get(dtype) or (8 if dtype.startswith("f8") else int(dtype[1:]))


def array_bytes(shape: str) -> float:
  """Bytes of every array in an HLO shape string, e.g. '(bf16[8,196]{1,0}, f32[])' -> 8*196*2 + 4."""
  return sum(_item_bits(dtype) / 8 * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in _ARRAY.findall(shape))


def _dims(shape: str) -> list[int]:
  match = _ARRAY.search(shape)
  return [int(d) for d in match.group(2).split(",") if d] if match else []


def _operands(text: str) -> list[str]:
  """Operand names of an instruction's argument list (text after the opening parenthesis)."""
  depth = 1
  for end, char in enumerate(text):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0:
      return re.findall(r"%([\w.\-]+)", text[:end])
  return re.findall(r"%([\w.\-]+)", text)


def _branches(text: str) -> list[str]:
  match = re.search(r"branch_computations=\{([^}]*)\}", text)
  return re.findall(r"%([\w.\-]+)", match.group(1)) if match else []


def parse(text: str) -> tuple[dict[str, dict], str]:
  """-> ({instruction name: record}, the entry computation's name); names are unique in a module."""
  instructions, computation, entry = {}, None, None
  for line in text.splitlines():
    if " = " not in line and (header := _HEADER.match(line)):
      computation = header.group(1)
      entry = computation if line.startswith("ENTRY") else entry
      continue
    if computation is None or not (match := _INSTRUCTION.match(line)):
      continue
    root, name, shape, opcode, rest = match.groups()
    op_name = re.search(r'op_name="([^"]*)"', rest)
    target = re.search(r'custom_call_target="([^"]*)"', rest)
    instructions[name] = {
        "name": name, "computation": computation, "shape": shape, "opcode": opcode, "operands": _operands(rest),
        "calls": re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", rest) + _branches(rest),
        "op_name": op_name.group(1) if op_name else "",
        "target": target.group(1) if target else "", "text": rest, "root": bool(root)}
  return instructions, entry


def bodies(instructions: dict) -> dict[str, list[dict]]:
  """{computation name: its instructions}."""
  out = {}
  for record in instructions.values():
    out.setdefault(record["computation"], []).append(record)
  return out


def opcodes_within(record: dict, computations: dict) -> set[str]:
  """The opcodes of an instruction and of every computation it calls, transitively (a fusion's body)."""
  seen, todo, found = set(), list(record["calls"]), {record["opcode"]}
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    for inner in computations.get(name, []):
      found.add(inner["opcode"])
      todo.extend(inner["calls"])
  return found


def _contracting(text: str, quoted: bool) -> list[int]:
  pattern = r'"lhs_contracting_dimensions":\[([^\]]*)\]' if quoted else r"lhs_contracting_dims=\{([\d,]*)\}"
  match = re.search(pattern, text)
  return [int(d) for d in re.findall(r"\d+", match.group(1))] if match else []


def _library_matmul(record: dict) -> bool:
  """A custom call into a matmul library (cuBLAS gemm, cublasLt matmul)."""
  return record["opcode"] == "custom-call" and ("gemm" in record["target"] or "matmul" in record["target"])


def matmul_flops(record: dict, instructions: dict, computations: dict) -> float:
  """2 * output size * contracted size of every dot the instruction runs (inside fusions and called
  computations, loop bodies times their known trip count), or of a cuBLAS call; 0 if none."""
  if record["opcode"] == "dot" or _library_matmul(record):
    lhs = _dims(instructions[record["operands"][0]]["shape"])
    contracting = _contracting(record["text"], quoted=record["opcode"] == "custom-call")
    return 2.0 * math.prod(_dims(record["shape"])) * math.prod(lhs[d] for d in contracting)
  inner = sum(matmul_flops(r, instructions, computations)
              for name in record["calls"] for r in computations.get(name, []))
  return inner * trip_count(record)


def trip_count(record: dict) -> int:
  """How many times a while loop runs, when XLA knows it (1 for every other instruction)."""
  trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', record["text"]) if record["opcode"] == "while" else None
  return int(trips.group(1)) if trips else 1


def category(record: dict, computations: dict) -> str:
  """matmul, convolution, transpose/copy, collective, reduction fusion, elementwise fusion or other."""
  opcodes = opcodes_within(record, computations)
  if "dot" in opcodes or _library_matmul(record):
    return "matmul"
  if "convolution" in opcodes or "conv" in record["target"]:
    return "convolution"
  if any(op.startswith(("all-", "reduce-scatter", "collective")) for op in opcodes):
    return "collective"
  if opcodes - {"fusion", "parameter", "bitcast"} <= {"transpose", "copy", "copy-start", "copy-done"}:
    return "transpose/copy"
  if record["opcode"] == "fusion":
    return "reduction fusion" if "reduce" in opcodes else "elementwise fusion"
  return "other"


def _parameter_number(record: dict) -> int:
  return int(re.match(r"\s*(\d+)", record["text"]).group(1))


def kernel_bytes(record: dict, instructions: dict, computations: dict) -> float:
  """Bytes a launched op reads and writes: its operands and its result, except that a fusion reads only
  the slices its dynamic-slices take of an operand, and updates a buffer in place with a
  dynamic-update-slice (as in a scan over stacked layers: it reads and writes the update, not the stack)."""
  operands = [instructions[o] for o in record["operands"] if o in instructions]
  if record["opcode"] != "fusion" or not record["calls"]:
    return array_bytes(record["shape"]) + sum(array_bytes(o["shape"]) for o in operands)
  body = computations.get(record["calls"][0], [])
  users = {}
  for inner in body:
    for position, name in enumerate(inner["operands"]):
      users.setdefault(name, []).append((inner, position))
  root = next((r for r in body if r["root"]), None)
  roots = [instructions[o] for o in root["operands"]] if root and root["opcode"] == "tuple" else [root]
  updates = [r for r in roots if r and r["opcode"] == "dynamic-update-slice"]
  in_place = {r["operands"][0] for r in updates}
  moved = array_bytes(record["shape"]) - sum(
      array_bytes(r["shape"]) - array_bytes(instructions[r["operands"][1]]["shape"]) for r in updates)
  for parameter in (r for r in body if r["opcode"] == "parameter"):
    number = _parameter_number(parameter)
    if number >= len(operands):
      continue
    uses = users.get(parameter["name"], [])
    if parameter["name"] in in_place and len(uses) == 1:
      continue  # the buffer updated in place: only the update is written (counted above).
    if uses and all(user["opcode"] == "dynamic-slice" and position == 0 for user, position in uses):
      moved += sum(array_bytes(user["shape"]) for user, _ in uses)
    else:
      moved += array_bytes(operands[number]["shape"])
  return moved
