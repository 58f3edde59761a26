"""The compiler: a validated profile in, plan files out (plan.json, userdata.sh, iam-policy.json, host-agent.json)."""

from controller.compiler.build import CompileResult, compile_reference
from controller.compiler.iam import render_iam_policy
from controller.compiler.plan import PLAN_FILES, CompiledPlan, compile_profile, write_plan
from controller.compiler.volumes import choose_additional_device

__all__ = [
    "CompileResult",
    "CompiledPlan",
    "PLAN_FILES",
    "choose_additional_device",
    "compile_profile",
    "compile_reference",
    "render_iam_policy",
    "write_plan",
]
