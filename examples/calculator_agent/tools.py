"""The calculator showcase's tools (a `tools` environment, docs/agentic.md): one tool, `calculate`.

The expression is parsed with `ast` and walked: only numbers, + - * / // % ** and parentheses
(no names, calls, attributes or anything else); never eval'd. Exponents and results are bounded so
no input can make it compute for long, and every failure is an 'Error: ...' string, never an
exception.
"""

from __future__ import annotations

import ast
import math
import operator
import re

MAX_LENGTH = 200  # characters of expression (also bounds the nesting depth)
MAX_EXPONENT = 100  # |exponent| of **
MAX_DIGITS = 100  # every intermediate result stays below 10**MAX_DIGITS

BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
FORBIDDEN = {ast.Name: "names", ast.Attribute: "attribute access", ast.Call: "function calls"}
# What models write for the same operators: 3 × 4, 8 ÷ 2, 2^10, −5, 1,234.
SPELLINGS = [("×", "*"), ("÷", "/"), ("^", "**"), ("−", "-")]
THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


class Refused(ValueError):
    pass


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression and return the result.

    Args:
        expression: numbers with + - * / // % ** and parentheses, e.g. "487 * 63 + 12"
    """
    try:
        if isinstance(expression, (int, float)) and not isinstance(expression, bool):
            expression = str(expression)
        if not isinstance(expression, str):
            raise Refused("the expression must be a string")
        if len(expression) > MAX_LENGTH:
            raise Refused(f"the expression is longer than {MAX_LENGTH} characters")
        for written, meant in SPELLINGS:
            expression = expression.replace(written, meant)
        tree = ast.parse(THOUSANDS.sub("", expression).strip().rstrip("="), mode="eval")
        return _format(_evaluate(tree.body))
    except Refused as e:
        return f"Error: {e}"
    except SyntaxError:
        return "Error: not an arithmetic expression"
    except ZeroDivisionError:
        return "Error: division by zero"
    except (OverflowError, MemoryError):
        return "Error: the result is too large"
    except Exception as e:  # a tool answers; it never raises
        return f"Error: {type(e).__name__}"


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return _checked(UNARY[type(node.op)](_evaluate(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT:
                raise Refused(f"exponents are limited to {MAX_EXPONENT}")
            if abs(left) > 1 and right * math.log10(abs(left)) > MAX_DIGITS:
                raise Refused("the result is too large")
        return _checked(BINARY[type(node.op)](left, right))
    what = FORBIDDEN.get(type(node)) or repr(ast.unparse(node)[:40])
    raise Refused(f"{what} not allowed; use numbers, + - * / // % ** and parentheses")


def _checked(value) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Refused("the result is not a real number")  # e.g. (-8) ** 0.5
    if (isinstance(value, float) and not math.isfinite(value)) or abs(value) >= 10**MAX_DIGITS:
        raise Refused("the result is too large")
    return value


def _format(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value) if isinstance(value, int) else f"{value:.12g}"


TOOLS = [calculate]
# Paid once an episode, the first time a call runs: the base model rarely calls the tool, and
# without it every group's reward is 0 (no signal). Correct answers are the grader's.
TOOL_CALL_REWARD = 0.2
