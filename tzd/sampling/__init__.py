"""The sampler: batched iterative unmasking (LLaDA low-confidence remasking, Fast-dLLM threshold
decoding and block KV cache)."""

from tzd.sampling.batch import DenoiseBatch, SlotStep
from tzd.sampling.generate import Fill, GenerationResult, finish, finish_canvas, generate
from tzd.sampling.infill import Layout
from tzd.sampling.params import RequestPlan, SamplingParams, SamplingParamsError, plan

__all__ = ["DenoiseBatch", "Fill", "GenerationResult", "Layout", "RequestPlan", "SamplingParams",
           "SamplingParamsError", "SlotStep", "finish", "finish_canvas", "generate", "plan"]
