"""VRAM per optimizer: planned without weights (plan.py, state.py), measured during
runs and by real steps (measure.py), shown as tables (render.py)."""

from .activations import CUDA_WORKSPACE_BYTES, step_activations
from .fit import GIB, fit, format_fit, gpu_memory_bytes, plan_run, verdict
from .measure import EMOTION_JUMP, cuda_memory_report, measure, process_peak_rss_bytes
from .plan import MB, REFERENCE, base_weight_bytes, lora_parameters, parse_optims, plan, plan_rows, row_key, shadow_settings
from .render import format_measure, format_table, row_label
from .state import init_optimizer_state, planned_state_bytes
