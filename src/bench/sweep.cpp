// Implementation of sweep.h.
#include "bench/sweep.h"

#include <algorithm>
#include <map>
#include <new>

#include "core/error.h"
#include "engine/generator.h"

namespace kvq {

std::vector<int32_t> point_prompt_lengths(int32_t length, int32_t batch, bool ragged, std::mt19937_64& rng) {
  if (length < 1 || batch < 1) fail("a bench point needs --prompt-len >= 1 and --batch >= 1, got {} x {}", length, batch);
  std::vector<int32_t> lengths(batch, length);
  if (ragged) {
    std::uniform_int_distribution<int32_t> draw(std::max(1, length / 4), length);
    for (int32_t& n : lengths) n = draw(rng);
  }
  return lengths;
}

int64_t pages_for_batch(const std::vector<int32_t>& prompt_lengths, int32_t gen, int32_t page, int32_t context) {
  int64_t pages = 0;
  for (int32_t n : prompt_lengths) {
    pages += (kv_tokens_needed(n, gen, context) + page - 1) / page;
  }
  return pages;
}

CapacityResult find_max_batch(const std::function<bool(int32_t)>& fits, int32_t hint, int32_t limit) {
  CapacityResult result;
  if (limit < 1) return result;
  std::map<int32_t, bool> asked;
  auto probe = [&](int32_t batch) {
    auto it = asked.find(batch);
    if (it != asked.end()) return it->second;
    const bool ok = fits(batch);
    asked[batch] = ok;
    result.probes.push_back({batch, ok});
    return ok;
  };
  // Bracket: `good` fits (0 stands for "none known"), `bad` does not (limit + 1: none known).
  int32_t good = 0, bad = limit + 1;
  const int32_t start = std::clamp(hint, 1, limit);
  if (probe(start)) {
    good = start;
    for (int32_t step = 1; good < limit;) {  // step up 1, 2, 4, ... until a batch does not fit
      const int32_t next = static_cast<int32_t>(std::min<int64_t>(int64_t{good} + step, limit));
      if (!probe(next)) {
        bad = next;
        break;
      }
      good = next;
      step = static_cast<int32_t>(std::min<int64_t>(int64_t{step} * 2, limit));
    }
  } else {
    bad = start;
  }
  while (bad - good > 1) {
    const int32_t middle = good + (bad - good) / 2;
    (probe(middle) ? good : bad) = middle;
  }
  result.max_batch = good;
  return result;
}

EnergyWindow measure_energy_window(const std::function<void()>& once,
                                   const std::function<std::optional<uint64_t>()>& read_energy_mj,
                                   const std::function<double()>& now, double min_seconds, int64_t min_repetitions,
                                   int64_t max_repetitions) {
  EnergyWindow window;
  const std::optional<uint64_t> start_mj = read_energy_mj();
  const double start = now();
  while (window.repetitions < std::max<int64_t>(min_repetitions, 1) ||
         (start_mj && window.seconds < min_seconds && window.repetitions < max_repetitions)) {
    once();
    ++window.repetitions;
    window.seconds = now() - start;
  }
  const std::optional<uint64_t> end_mj = read_energy_mj();
  if (start_mj && end_mj && *end_mj >= *start_mj) window.joules = static_cast<double>(*end_mj - *start_mj) / 1000.0;
  return window;
}

std::string failure_status(const std::exception& error) {
  if (dynamic_cast<const std::bad_alloc*>(&error) != nullptr) return "oom";
  const std::string what = error.what();
  // cudaErrorMemoryAllocation reads "out of memory"; cuBLAS status 3 is CUBLAS_STATUS_ALLOC_FAILED.
  for (const char* needle : {"out of memory", "cudaErrorMemoryAllocation", "CUBLAS_STATUS_ALLOC_FAILED", "cuBLAS error 3 "}) {
    if (what.find(needle) != std::string::npos) return "oom";
  }
  return what;
}

PerMillionTokens per_million_tokens(double joules_per_token, const EnergyPrices& prices) {
  PerMillionTokens out;
  out.kwh = joules_per_token * 1e6 * prices.pue / 3.6e6;
  out.gco2 = out.kwh * prices.grid_gco2_per_kwh;
  out.usd = out.kwh * prices.usd_per_kwh;
  return out;
}

}  // namespace kvq
