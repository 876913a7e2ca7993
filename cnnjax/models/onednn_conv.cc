// oneDNN's convolutions as XLA:CPU FFI handlers: the forward pass, the input gradient and
// the filter gradient of a float32 NHWC/HWIO convolution (cnnjax/models/onednn.py builds
// this file and says when it is used).
//
// Arrays come and go in XLA's layouts: activations NHWC, kernels HWIO. Attribute `layout`
// says what oneDNN may compute in: 0, activations as given (its NHWC kernels) and the
// kernel in its preferred blocked layout; 1, everything in its preferred layouts (the
// direct kernels for small maps), reordered on the way in and out. Which is faster depends
// on the layer and the CPU, so cnnjax's tuning measures both.
//
// A primitive is created once per pass, layout and shape and kept for the process; its
// execution is thread-safe because every call brings its own scratch memory.

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Rank-4 float32 arrays (a macro argument cannot hold the template's comma).
using Array4 = ffi::Buffer<ffi::F32, 4>;
using Result4 = ffi::ResultBuffer<ffi::F32, 4>;

enum class Pass { kForward, kInputGradient, kFilterGradient };

// Operands of one pass, in the order oneDNN's execute arguments name them: two inputs and
// one output.
struct Operand {
  int arg = 0;
  dnnl_memory_desc_t given = nullptr;          // XLA's layout
  const_dnnl_memory_desc_t used = nullptr;     // the primitive's (owned by `pd`)
  dnnl_primitive_t reorder = nullptr;          // given <-> used, where they differ
  size_t bytes = 0;                            // of the reordered copy
};

struct Plan {
  dnnl_primitive_desc_t pd = nullptr;
  dnnl_primitive_t primitive = nullptr;
  Operand operands[3];
  size_t scratch_bytes = 0;
  const_dnnl_memory_desc_t scratch = nullptr;
};

dnnl_engine_t Engine() {
  static dnnl_engine_t engine = [] {
    dnnl_engine_t e = nullptr;
    dnnl_engine_create(&e, dnnl_cpu, 0);
    return e;
  }();
  return engine;
}

ffi::Error Failed(const char* what, dnnl_status_t status) {
  return ffi::Error(ffi::ErrorCode::kInternal,
                    std::string("oneDNN: ") + what + " failed with status " +
                        std::to_string(static_cast<int>(status)));
}

#define RETURN_IF_FAILED(what, expression)                   \
  do {                                                       \
    dnnl_status_t status_ = (expression);                    \
    if (status_ != dnnl_success) return Failed(what, status_); \
  } while (0)

// Shapes in oneDNN's logical order (N, C, H, W) and (O, I, KH, KW) from XLA's NHWC and HWIO.
struct Shapes {
  dnnl_dims_t input, kernel, output;
};

ffi::Error CreatePlan(Pass pass, int64_t layout, const Shapes& shapes,
                      ffi::Span<const int64_t> window, Plan* plan) {
  dnnl_memory_desc_t given_input, given_kernel, given_output, any_input, any_kernel, any_output;
  RETURN_IF_FAILED("input descriptor", dnnl_memory_desc_create_with_tag(
      &given_input, 4, shapes.input, dnnl_f32, dnnl_nhwc));
  RETURN_IF_FAILED("kernel descriptor", dnnl_memory_desc_create_with_tag(
      &given_kernel, 4, shapes.kernel, dnnl_f32, dnnl_hwio));
  RETURN_IF_FAILED("output descriptor", dnnl_memory_desc_create_with_tag(
      &given_output, 4, shapes.output, dnnl_f32, dnnl_nhwc));
  RETURN_IF_FAILED("input descriptor", dnnl_memory_desc_create_with_tag(
      &any_input, 4, shapes.input, dnnl_f32, dnnl_format_tag_any));
  RETURN_IF_FAILED("kernel descriptor", dnnl_memory_desc_create_with_tag(
      &any_kernel, 4, shapes.kernel, dnnl_f32, dnnl_format_tag_any));
  RETURN_IF_FAILED("output descriptor", dnnl_memory_desc_create_with_tag(
      &any_output, 4, shapes.output, dnnl_f32, dnnl_format_tag_any));
  const_dnnl_memory_desc_t input = layout == 0 ? given_input : any_input;
  const_dnnl_memory_desc_t output = layout == 0 ? given_output : any_output;

  dnnl_dims_t strides = {window[0], window[1]};
  dnnl_dims_t padding_low = {window[2], window[4]};
  dnnl_dims_t padding_high = {window[3], window[5]};
  dnnl_dims_t dilation = {window[6] - 1, window[7] - 1};  // oneDNN counts the gaps

  dnnl_primitive_attr_t attr;
  RETURN_IF_FAILED("attributes", dnnl_primitive_attr_create(&attr));
  RETURN_IF_FAILED("scratchpad mode",
                   dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user));

  dnnl_primitive_desc_t forward;
  RETURN_IF_FAILED("forward descriptor", dnnl_convolution_forward_primitive_desc_create(
      &forward, Engine(), pass == Pass::kForward ? dnnl_forward_inference : dnnl_forward_training,
      dnnl_convolution_direct, input, any_kernel, nullptr, output, strides, dilation,
      padding_low, padding_high, attr));
  // (query, argument, descriptor in XLA's layout) of the two inputs and the output.
  struct Slot { dnnl_query_t query; int arg; dnnl_memory_desc_t given; };
  Slot slots[3];
  if (pass == Pass::kForward) {
    plan->pd = forward;
    slots[0] = {dnnl_query_src_md, DNNL_ARG_SRC, given_input};
    slots[1] = {dnnl_query_weights_md, DNNL_ARG_WEIGHTS, given_kernel};
    slots[2] = {dnnl_query_dst_md, DNNL_ARG_DST, given_output};
  } else if (pass == Pass::kInputGradient) {
    RETURN_IF_FAILED("input-gradient descriptor",
                     dnnl_convolution_backward_data_primitive_desc_create(
        &plan->pd, Engine(), dnnl_convolution_direct, input, any_kernel, output, strides,
        dilation, padding_low, padding_high, forward, attr));
    slots[0] = {dnnl_query_diff_dst_md, DNNL_ARG_DIFF_DST, given_output};
    slots[1] = {dnnl_query_weights_md, DNNL_ARG_WEIGHTS, given_kernel};
    slots[2] = {dnnl_query_diff_src_md, DNNL_ARG_DIFF_SRC, given_input};
  } else {
    RETURN_IF_FAILED("filter-gradient descriptor",
                     dnnl_convolution_backward_weights_primitive_desc_create(
        &plan->pd, Engine(), dnnl_convolution_direct, input, any_kernel, nullptr, output,
        strides, dilation, padding_low, padding_high, forward, attr));
    slots[0] = {dnnl_query_src_md, DNNL_ARG_SRC, given_input};
    slots[1] = {dnnl_query_diff_dst_md, DNNL_ARG_DIFF_DST, given_output};
    slots[2] = {dnnl_query_diff_weights_md, DNNL_ARG_DIFF_WEIGHTS, given_kernel};
  }
  RETURN_IF_FAILED("primitive", dnnl_primitive_create(&plan->primitive, plan->pd));
  for (int i = 0; i < 3; ++i) {
    Operand& operand = plan->operands[i];
    operand.arg = slots[i].arg;
    operand.given = slots[i].given;
    operand.used = dnnl_primitive_desc_query_md(plan->pd, slots[i].query, 0);
    if (dnnl_memory_desc_equal(operand.given, operand.used)) continue;
    operand.bytes = dnnl_memory_desc_get_size(operand.used);
    const bool output_operand = i == 2;
    dnnl_primitive_desc_t reorder_pd;
    RETURN_IF_FAILED("reorder descriptor", dnnl_reorder_primitive_desc_create(
        &reorder_pd, output_operand ? operand.used : operand.given, Engine(),
        output_operand ? operand.given : operand.used, Engine(), nullptr));
    RETURN_IF_FAILED("reorder", dnnl_primitive_create(&operand.reorder, reorder_pd));
  }
  plan->scratch = dnnl_primitive_desc_query_md(plan->pd, dnnl_query_scratchpad_md, 0);
  plan->scratch_bytes = dnnl_memory_desc_get_size(plan->scratch);
  if (plan->pd != forward) dnnl_primitive_desc_destroy(forward);  // the hint was copied
  for (dnnl_memory_desc_t desc : {any_input, any_kernel, any_output}) dnnl_memory_desc_destroy(desc);
  dnnl_primitive_attr_destroy(attr);
  return ffi::Error::Success();
}

std::string Key(Pass pass, int64_t layout, const Shapes& shapes,
                ffi::Span<const int64_t> window) {
  std::string key = std::to_string(static_cast<int>(pass)) + ":" + std::to_string(layout);
  for (const dnnl_dim_t* dims : {shapes.input, shapes.kernel, shapes.output})
    for (int i = 0; i < 4; ++i) key += "," + std::to_string(dims[i]);
  for (int64_t value : window) key += "," + std::to_string(value);
  return key;
}

ffi::Error FindPlan(Pass pass, int64_t layout, const Shapes& shapes,
                    ffi::Span<const int64_t> window, const Plan** found) {
  static std::mutex mutex;
  static auto* plans = new std::unordered_map<std::string, std::unique_ptr<Plan>>();
  const std::string key = Key(pass, layout, shapes, window);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = plans->find(key);
  if (it == plans->end()) {
    auto plan = std::make_unique<Plan>();
    if (ffi::Error error = CreatePlan(pass, layout, shapes, window, plan.get()); error.failure())
      return error;
    it = plans->emplace(key, std::move(plan)).first;
  }
  *found = it->second.get();
  return ffi::Error::Success();
}

struct FreeDeleter { void operator()(void* p) const { std::free(p); } };

// Runs `plan` on XLA's buffers: the inputs (reordered into the primitive's layouts where
// they differ), the primitive, then the output reordered back where it differs.
ffi::Error Execute(const Plan& plan, void* const buffers[3]) {
  thread_local dnnl_stream_t stream = [] {
    dnnl_stream_t s = nullptr;
    dnnl_stream_create(&s, Engine(), dnnl_stream_default_flags);
    return s;
  }();
  if (stream == nullptr) return Failed("stream", dnnl_runtime_error);
  constexpr size_t kAlign = 64;
  auto rounded = [](size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; };
  size_t total = rounded(plan.scratch_bytes);
  for (const Operand& operand : plan.operands) total += rounded(operand.bytes);
  std::unique_ptr<char, FreeDeleter> arena(
      static_cast<char*>(std::aligned_alloc(kAlign, total > 0 ? total : kAlign)));
  if (!arena) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "oneDNN: out of memory");

  std::vector<dnnl_memory_t> memories;
  auto memory = [&](const_dnnl_memory_desc_t desc, void* data) {
    dnnl_memory_t m = nullptr;
    if (dnnl_memory_create(&m, desc, Engine(), data) == dnnl_success) memories.push_back(m);
    return m;
  };
  struct Release {
    std::vector<dnnl_memory_t>& memories;
    ~Release() { for (dnnl_memory_t m : memories) dnnl_memory_destroy(m); }
  } release{memories};

  char* next = arena.get();
  dnnl_exec_arg_t args[4];
  dnnl_memory_t given[3], used[3];
  for (int i = 0; i < 3; ++i) {
    const Operand& operand = plan.operands[i];
    given[i] = memory(operand.given, buffers[i]);
    used[i] = operand.reorder ? memory(operand.used, next) : given[i];
    if (given[i] == nullptr || used[i] == nullptr) return Failed("memory", dnnl_runtime_error);
    next += rounded(operand.bytes);
    args[i] = {operand.arg, used[i]};
  }
  dnnl_memory_t scratch = memory(plan.scratch, next);
  if (scratch == nullptr) return Failed("scratchpad memory", dnnl_runtime_error);
  args[3] = {DNNL_ARG_SCRATCHPAD, scratch};

  for (int i = 0; i < 2; ++i) {
    if (!plan.operands[i].reorder) continue;
    dnnl_exec_arg_t reorder_args[2] = {{DNNL_ARG_FROM, given[i]}, {DNNL_ARG_TO, used[i]}};
    RETURN_IF_FAILED("input reorder",
                     dnnl_primitive_execute(plan.operands[i].reorder, stream, 2, reorder_args));
  }
  RETURN_IF_FAILED("convolution", dnnl_primitive_execute(plan.primitive, stream, 4, args));
  if (plan.operands[2].reorder) {
    dnnl_exec_arg_t reorder_args[2] = {{DNNL_ARG_FROM, used[2]}, {DNNL_ARG_TO, given[2]}};
    RETURN_IF_FAILED("output reorder",
                     dnnl_primitive_execute(plan.operands[2].reorder, stream, 2, reorder_args));
  }
  RETURN_IF_FAILED("stream wait", dnnl_stream_wait(stream));
  return ffi::Error::Success();
}

ffi::Error CheckWindow(ffi::Span<const int64_t> window, int64_t layout) {
  if (window.size() != 8)
    return ffi::Error::InvalidArgument(
        "window must be (stride h, stride w, pad top, pad bottom, pad left, pad right, "
        "dilation h, dilation w)");
  if (layout != 0 && layout != 1)
    return ffi::Error::InvalidArgument("layout must be 0 (NHWC) or 1 (oneDNN's choice)");
  return ffi::Error::Success();
}

// x (N, H, W, C) and kernel (KH, KW, C, O) give y (N, OH, OW, O).
Shapes ShapesOf(ffi::Span<const int64_t> x, ffi::Span<const int64_t> kernel,
                ffi::Span<const int64_t> y) {
  return Shapes{{x[0], x[3], x[1], x[2]},
                {kernel[3], kernel[2], kernel[0], kernel[1]},
                {y[0], y[3], y[1], y[2]}};
}

// One pass on XLA's buffers (its two inputs and its output, in that order).
ffi::Error Run(Pass pass, const Shapes& shapes, void* const buffers[3],
               ffi::Span<const int64_t> window, int64_t layout) {
  if (ffi::Error error = CheckWindow(window, layout); error.failure()) return error;
  const Plan* plan;
  if (ffi::Error error = FindPlan(pass, layout, shapes, window, &plan); error.failure())
    return error;
  return Execute(*plan, buffers);
}

ffi::Error Forward(Array4 x, Array4 kernel, Result4 y, ffi::Span<const int64_t> window,
                   int64_t layout) {
  void* const buffers[3] = {x.untyped_data(), kernel.untyped_data(), y->untyped_data()};
  return Run(Pass::kForward, ShapesOf(x.dimensions(), kernel.dimensions(), y->dimensions()),
             buffers, window, layout);
}

ffi::Error InputGradient(Array4 grad_y, Array4 kernel, Result4 grad_x,
                         ffi::Span<const int64_t> window, int64_t layout) {
  void* const buffers[3] = {grad_y.untyped_data(), kernel.untyped_data(),
                            grad_x->untyped_data()};
  return Run(Pass::kInputGradient,
             ShapesOf(grad_x->dimensions(), kernel.dimensions(), grad_y.dimensions()), buffers,
             window, layout);
}

ffi::Error FilterGradient(Array4 x, Array4 grad_y, Result4 grad_kernel,
                          ffi::Span<const int64_t> window, int64_t layout) {
  void* const buffers[3] = {x.untyped_data(), grad_y.untyped_data(),
                            grad_kernel->untyped_data()};
  return Run(Pass::kFilterGradient,
             ShapesOf(x.dimensions(), grad_kernel->dimensions(), grad_y.dimensions()), buffers,
             window, layout);
}

// Every pass takes two rank-4 arrays and gives one, with the window and the layout.
auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<Array4>()
      .Arg<Array4>()
      .Ret<Array4>()
      .Attr<ffi::Span<const int64_t>>("window")
      .Attr<int64_t>("layout");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(cnnjax_onednn_conv_forward, Forward, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(cnnjax_onednn_conv_input_gradient, InputGradient, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(cnnjax_onednn_conv_filter_gradient, FilterGradient, Binding());

// The oneDNN library's version, for the tuning table's key: major * 10000 + minor * 100 +
// patch.
extern "C" int cnnjax_onednn_version() {
  const dnnl_version_t* version = dnnl_version();
  return version->major * 10000 + version->minor * 100 + version->patch;
}
