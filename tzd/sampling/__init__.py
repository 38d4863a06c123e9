"""The sampler: batched iterative unmasking (LLaDA low-confidence remasking, Fast-dLLM threshold
decoding and block KV cache)."""

from clients.protocol import SamplingParams  # the wire schema, the public way to ask (DESIGN.md)
from tzd.sampling.batch import DenoiseBatch, SlotStep
from tzd.sampling.config import EngineConfig
from tzd.sampling.core import CoreStep, EngineCore
from tzd.sampling.generate import Fill, GenerationResult, finish, finish_canvas, generate
from tzd.sampling.infill import Layout
from tzd.sampling.params import DecodeParams, RequestPlan, SamplingParamsError, plan
from tzd.sampling.scheduler import CoreRequest, QueueFull, Scheduler, Status

__all__ = ["CoreRequest", "CoreStep", "DecodeParams", "DenoiseBatch", "EngineConfig", "EngineCore", "Fill",
           "GenerationResult", "Layout", "QueueFull", "RequestPlan", "SamplingParams", "SamplingParamsError",
           "Scheduler", "SlotStep", "Status", "finish", "finish_canvas", "generate", "plan"]
