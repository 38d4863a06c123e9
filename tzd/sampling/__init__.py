"""The sampler: batched iterative unmasking (LLaDA low-confidence remasking, Fast-dLLM threshold
decoding and block KV cache)."""

from tzd.sampling.batch import DenoiseBatch, SlotStep
from tzd.sampling.generate import GenerationResult, finish, generate
from tzd.sampling.params import RequestPlan, SamplingParams, SamplingParamsError, plan

__all__ = ["DenoiseBatch", "GenerationResult", "RequestPlan", "SamplingParams", "SamplingParamsError",
           "SlotStep", "finish", "generate", "plan"]
