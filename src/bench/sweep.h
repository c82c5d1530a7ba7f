// The logic of kvq bench that needs no model or device, so unit tests can run
// it with fake runners: the prompt lengths of a point, the KV pages a batch
// needs, the capacity search, the energy window, failure classification and
// the carbon and cost of a measured J/token.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace kvq {

// The prompt lengths of one point: `batch` prompts of `length` tokens, or with
// `ragged` lengths drawn uniformly in [max(1, length / 4), length].
std::vector<int32_t> point_prompt_lengths(int32_t length, int32_t batch, bool ragged, std::mt19937_64& rng);

// KV pages a batch holds at once when every sequence is admitted: per sequence
// the prompt plus gen - 1 generated tokens (the last one is never fed back),
// capped at the context, rounded up to pages (as Generator reserves them).
int64_t pages_for_batch(const std::vector<int32_t>& prompt_lengths, int32_t gen, int32_t page, int32_t context);

struct CapacityProbe {
  int32_t batch = 0;
  bool fits = false;
};

struct CapacityResult {
  int32_t max_batch = 0;              // 0 when not even one sequence fits
  std::vector<CapacityProbe> probes;  // in the order they ran
};

// The largest batch in [1, limit] for which fits(batch) holds, assuming that a
// batch that fits means every smaller one fits too. fits() is a real run (or
// a check that refuses before running), so the search starts at `hint` (an
// estimate from the pool's accounting) and asks about as few batches as it
// can: with an exact hint, hint and hint + 1. Unless max_batch == limit, the
// probes include max_batch + 1 not fitting, and never ask a batch twice.
CapacityResult find_max_batch(const std::function<bool(int32_t)>& fits, int32_t hint, int32_t limit);

struct EnergyWindow {
  double seconds = 0;           // wall time of the window
  int64_t repetitions = 0;      // runs of the measured phase inside it
  std::optional<double> joules;  // counter difference over the window; nullopt when the counter is unavailable
};

// Runs `once` (one repetition of the measured phase) at least min_repetitions
// times and, when the counter is readable, until the window has lasted
// min_seconds (at most max_repetitions), reading the energy counter (in
// millijoules) just before the first run and after the last. `now` gives
// seconds on a monotonic clock.
EnergyWindow measure_energy_window(const std::function<void()>& once,
                                   const std::function<std::optional<uint64_t>()>& read_energy_mj,
                                   const std::function<double()>& now, double min_seconds, int64_t min_repetitions,
                                   int64_t max_repetitions);

// "oom" for an allocation failure (std::bad_alloc, CUDA or cuBLAS out of
// memory), else the error's text: the value of a result's "status".
std::string failure_status(const std::exception& error);

// Assumptions that turn J/token into carbon and cost (printed with the results).
struct EnergyPrices {
  double grid_gco2_per_kwh = 400;  // grams of CO2-equivalent per kWh drawn from the grid
  double usd_per_kwh = 0.10;       // electricity price
  double pue = 1.0;                // data-centre power usage effectiveness (1: the board's energy alone)
};

struct PerMillionTokens {
  double kwh = 0;
  double gco2 = 0;
  double usd = 0;
};

PerMillionTokens per_million_tokens(double joules_per_token, const EnergyPrices& prices);

}  // namespace kvq
