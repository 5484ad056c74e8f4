"""The hypothesis profiles of the property-based tests (test_properties.py, the emulated CUDA
decode in test_cuda_emulation.py): ``default`` runs a few derandomized examples (reproducible in
CI), ``LLM_KERNELS_HYPOTHESIS_PROFILE=long`` many more, freshly random each time (a failure
prints the blob that reproduces it with ``@reproduce_failure``)."""
import os

from hypothesis import HealthCheck, settings

PROFILE_ENV = "LLM_KERNELS_HYPOTHESIS_PROFILE"
settings.register_profile(
    "llm_kernels-default", max_examples=15, deadline=None, derandomize=True, database=None,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("llm_kernels-long", settings.get_profile("llm_kernels-default"),
                          max_examples=250, derandomize=False)


def profile() -> settings:
    """The profile $LLM_KERNELS_HYPOTHESIS_PROFILE selects (default: ``default``)."""
    name = os.environ.get(PROFILE_ENV, "default")
    return settings.get_profile(f"llm_kernels-{name}")
