# Hand-written (enginekit): `tensorrt_lean` is the runtime-only TensorRT module (tensorrt-lean-cu13).
# It re-exports the runtime half of the tensorrt stubs. Left out on purpose, because the lean
# module has none of them (checked against the 11.4.0.106 binding): Builder, IBuilderConfig,
# INetworkDefinition, OnnxParser, EngineInspector and the layer classes, so code that reaches for
# them through tensorrt_lean fails type checking instead of failing at run time.
from tensorrt_bindings.tensorrt import (
    DataType as DataType,
    Dims as Dims,
    ExecutionContextAllocationStrategy as ExecutionContextAllocationStrategy,
    HardwareCompatibilityLevel as HardwareCompatibilityLevel,
    ICudaEngine as ICudaEngine,
    IExecutionContext as IExecutionContext,
    IHostMemory as IHostMemory,
    ILogger as ILogger,
    IOptimizationProfile as IOptimizationProfile,
    IOutputAllocator as IOutputAllocator,
    IRuntimeConfig as IRuntimeConfig,
    IStreamReaderV2 as IStreamReaderV2,
    Logger as Logger,
    ProfilingVerbosity as ProfilingVerbosity,
    Runtime as Runtime,
    TensorIOMode as TensorIOMode,
    TensorLocation as TensorLocation,
    get_plugin_registry as get_plugin_registry,
)
from tensorrt import nptype as nptype, volume as volume

__version__: str
