// CPU op for VisionZip's contextual merge (see vllm_glimpse/visionzip.py for the algorithm):
//   merged[c] = targets[c] + mean{ members[i] : assignment[i] == c }   (targets[c] if none)
// One pass over the members accumulating in float32, then one scaled add per target row;
// parallel over the hidden dimension so rows are written by one thread each.
#include <torch/extension.h>

#include <vector>

torch::Tensor contextual_merge(torch::Tensor members, torch::Tensor assignment,
                               torch::Tensor targets) {
  TORCH_CHECK(members.dim() == 2, "members must be [M, H], got ", members.sizes());
  TORCH_CHECK(targets.dim() == 2, "targets must be [C, H], got ", targets.sizes());
  TORCH_CHECK(assignment.dim() == 1 && assignment.size(0) == members.size(0),
              "assignment must be [M] with M = members.size(0)");
  TORCH_CHECK(members.size(1) == targets.size(1), "members and targets differ in H");
  TORCH_CHECK(members.device().is_cpu() && targets.device().is_cpu() && assignment.device().is_cpu(),
              "contextual_merge is the CPU path; use the Triton kernel on GPU");

  const auto m = members.contiguous().to(torch::kFloat);
  const auto a = assignment.contiguous().to(torch::kLong);
  auto out = targets.contiguous().to(torch::kFloat).clone();
  const int64_t num_members = m.size(0), num_targets = out.size(0), hidden = out.size(1);

  std::vector<int64_t> counts(num_targets, 0);
  const int64_t* assign = a.data_ptr<int64_t>();
  for (int64_t i = 0; i < num_members; ++i) {
    TORCH_CHECK(assign[i] >= 0 && assign[i] < num_targets, "assignment[", i, "] = ", assign[i],
                " is outside [0, ", num_targets, ")");
    ++counts[assign[i]];
  }
  auto sums = torch::zeros({num_targets, hidden}, torch::kFloat);
  const float* src = m.data_ptr<float>();
  float* acc = sums.data_ptr<float>();
  at::parallel_for(0, hidden, 64, [&](int64_t h0, int64_t h1) {
    for (int64_t i = 0; i < num_members; ++i) {
      const float* row = src + i * hidden;
      float* dst = acc + assign[i] * hidden;
      for (int64_t h = h0; h < h1; ++h) dst[h] += row[h];
    }
  });
  float* o = out.data_ptr<float>();
  for (int64_t c = 0; c < num_targets; ++c) {
    if (counts[c] == 0) continue;
    const float inv = 1.0f / static_cast<float>(counts[c]);
    for (int64_t h = 0; h < hidden; ++h) o[c * hidden + h] += acc[c * hidden + h] * inv;
  }
  return out.to(targets.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("contextual_merge", &contextual_merge,
        "VisionZip contextual merge: targets + per-target mean of assigned members (CPU)");
}
