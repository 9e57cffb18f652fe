"""A safe evaluator for `calculate_output` formulas of multi graders, e.g.
"0.7 * correctness + 0.3 * min(style, 1)": numbers, the sub-graders' names, + - * / ^ (power,
as in OpenAI's grader formulas) ** %, and a few functions. Parsed with `ast` and walked over a
whitelist; nothing is ever passed to eval()."""

from __future__ import annotations

import ast
import math
import operator

FUNCTIONS = {
    "min": min,
    "max": max,
    "abs": abs,
    "floor": math.floor,
    "ceil": math.ceil,
    "exp": math.exp,
    "sqrt": math.sqrt,
    "log": math.log,
    "round": round,
}
BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.Mod: operator.mod,
}
UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_FORMULA_CHARS = 2000


class FormulaError(ValueError):
    pass


def parse(formula: str, names: set[str]) -> ast.Expression:
    """Check `formula` uses only whitelisted syntax and known names; raises FormulaError."""
    if len(formula) > MAX_FORMULA_CHARS:
        raise FormulaError(f"longer than {MAX_FORMULA_CHARS} characters")
    try:
        tree = ast.parse(formula.replace("^", "**"), mode="eval")
    except SyntaxError as e:
        raise FormulaError(f"not a valid expression: {e.msg}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS) or node.keywords:
                raise FormulaError(f"only the functions {sorted(FUNCTIONS)} may be called")
        elif isinstance(node, ast.Name):
            if node.id not in names and node.id not in FUNCTIONS:
                raise FormulaError(f"unknown name {node.id!r} (sub-graders: {sorted(names)})")
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float)) or isinstance(node.value, bool):
                raise FormulaError(f"only numbers may appear as constants, not {node.value!r}")
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in BINARY:
                raise FormulaError(f"operator {type(node.op).__name__} is not allowed")
        elif isinstance(node, ast.UnaryOp):
            if type(node.op) not in UNARY:
                raise FormulaError(f"operator {type(node.op).__name__} is not allowed")
        elif not isinstance(node, (ast.Expression, ast.Load) + tuple(BINARY) + tuple(UNARY)):
            raise FormulaError(f"{type(node).__name__} is not allowed")
    return tree


def evaluate(tree: ast.Expression, scores: dict[str, float]) -> float:
    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return scores[node.id]
        if isinstance(node, ast.BinOp):
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise FormulaError("exponent too large")
            return BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp):
            return UNARY[type(node.op)](walk(node.operand))
        return FUNCTIONS[node.func.id](*(walk(arg) for arg in node.args))

    try:
        return float(walk(tree))
    except (ArithmeticError, ValueError, TypeError) as e:
        raise FormulaError(f"cannot be computed for scores {scores}: {e}") from None
