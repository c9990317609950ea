"""A tvm_ffi Module of kind "vulkan" that carries our serialized bytes.

`target.build.<kind>` must return a runtime Module, and `export_library` serialises every imported device
module
through its C++ `SaveToBytes()` under its `kind()`. Python cannot subclass `ffi::ModuleObj`, so a 40-line C++
module (compiled once with tvm_ffi.cpp.load_inline and cached under ~/.cache/tvm-ffi) holds the blob that
module_format.encode_module produced. It mirrors TVM's own VulkanFallbackModuleNode (the class TVM uses when
the
Vulkan runtime is not linked): kind "vulkan", binary-serialisable, not runnable here.
"""

from __future__ import annotations

import threading

import tvm_ffi

_CPP = r"""
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/string.h>

namespace {
using namespace tvm::ffi;

class ToolkitVulkanModule : public ModuleObj {
 public:
  ToolkitVulkanModule(Bytes blob, Map<String, String> source) : blob_(blob), source_(source) {}
  const char* kind() const final { return "vulkan"; }
  int GetPropertyMask() const final { return Module::kBinarySerializable; }
  Optional<Function> GetFunction(const String& name) final {
    // Kernels run only under a TVM runtime built with USE_VULKAN=ON (which loads these bytes itself).
    return std::nullopt;
  }
  Bytes SaveToBytes() const final { return blob_; }
  String InspectSource(const String& format) const final {
    auto it = source_.find(format.empty() ? String("glsl") : format);
    if (it != source_.end()) return (*it).second;
    return String();
  }

 private:
  Bytes blob_;
  Map<String, String> source_;
};
}  // namespace

Module make_vulkan_module(Bytes blob, Map<String, String> source) {
  return Module(make_object<ToolkitVulkanModule>(blob, source));
}

Bytes module_save_to_bytes(Module mod) {
  return mod->SaveToBytes();
}
"""

_LOCK = threading.Lock()
_LIB = None


def _lib():
    global _LIB
    with _LOCK:
        if _LIB is None:
            from tvm_ffi.cpp import load_inline

            _LIB = load_inline(
                "toolkit_vulkan_module",
                cpp_sources=_CPP,
                functions=["make_vulkan_module", "module_save_to_bytes"],
            )
        return _LIB


def make_module(blob: bytes, sources: dict[str, str]) -> tvm_ffi.Module:
    """A Module of kind "vulkan" whose SaveToBytes() returns `blob` byte for byte."""
    return _lib().make_vulkan_module(bytes(blob), dict(sources))


def save_to_bytes(mod: tvm_ffi.Module) -> bytes:
    """`mod->SaveToBytes()` of any binary-serialisable module (ours or TVM's, e.g. webgpu)."""
    return bytes(_lib().module_save_to_bytes(mod))
