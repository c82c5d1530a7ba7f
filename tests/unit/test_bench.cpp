// The bench's logic without a model or device (src/bench/sweep.h): ragged
// lengths, the pages a batch needs (checked against what the generator really
// reserves), the capacity search against fake runners, the energy window with a
// fake clock and counter, failure classification, carbon and cost; the NVML
// loader where there is no library; and the --json file a long run rewrites
// after every point.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <new>
#include <set>

#include "bench/nvml_energy.h"
#include "bench/sweep.h"
#include "core/error.h"
#include "core/run_report.h"
#include "cpu/cpu_backend.h"
#include "engine/generator.h"
#include "kv/page_tables.h"
#include "tiny_model.h"

namespace kvq {
namespace {

TEST(BenchSweep, RaggedLengthsAreUniformInAQuarterToTheFullLength) {
  std::mt19937_64 rng(7);
  EXPECT_EQ(point_prompt_lengths(100, 3, false, rng), std::vector<int32_t>(3, 100));
  const std::vector<int32_t> ragged = point_prompt_lengths(100, 4000, true, rng);
  std::set<int32_t> seen(ragged.begin(), ragged.end());
  EXPECT_EQ(*seen.begin(), 25);  // 4000 draws over 76 values: both ends appear
  EXPECT_EQ(*seen.rbegin(), 100);
  EXPECT_EQ(seen.size(), 76u);
  EXPECT_EQ(point_prompt_lengths(2, 8, true, rng).size(), 8u);  // L/4 == 0 still draws from [1, L]
  for (int32_t n : point_prompt_lengths(2, 64, true, rng)) EXPECT_TRUE(n == 1 || n == 2);
  EXPECT_THROW(point_prompt_lengths(0, 1, false, rng), Error);
  EXPECT_THROW(point_prompt_lengths(8, 0, false, rng), Error);
}

TEST(BenchSweep, PagesForBatchCountsPromptPlusFedBackTokensCappedAtContext) {
  EXPECT_EQ(pages_for_batch({64}, 1, 64, 1000), 1);   // 64 tokens: one page
  EXPECT_EQ(pages_for_batch({64}, 2, 64, 1000), 2);   // + 1 fed-back token
  EXPECT_EQ(pages_for_batch({10, 100}, 5, 16, 1000), 1 + 7);  // 14 -> 1, 104 -> 7
  EXPECT_EQ(pages_for_batch({250}, 100, 64, 256), 4);  // capped at the context
}

// The bench sizes each point's pool with pages_for_batch: with exactly that
// many pages the generator must admit the whole batch at once.
TEST(BenchSweep, PagesForBatchIsWhatTheGeneratorHoldsForTheWholeBatch) {
  const LlamaConfig c = testing::tiny_config();
  const LlamaWeights w = testing::random_weights(c, 3);
  std::mt19937_64 rng(11);
  for (int32_t page : {4, 16}) {
    for (int32_t gen : {1, 3}) {
      const std::vector<int32_t> lengths = point_prompt_lengths(40, 5, true, rng);
      const int64_t pages = pages_for_batch(lengths, gen, page, c.context);
      std::vector<GenerationRequest> requests;
      std::mt19937 ids(5);
      for (int32_t n : lengths) requests.push_back({testing::random_ids(ids, n, c.vocab), gen});
      for (int64_t pool : {pages, pages - 1}) {
        CpuBackend backend(c, w, static_cast<int32_t>(pool), page);
        PageTables tables(static_cast<int32_t>(pool), page);
        Generator generator(c, backend, tables, {64, {}}, [](int32_t) { return false; });
        generator.generate(requests);
        // Peak pages are the whole batch's only when it all fits; one page less must split it.
        EXPECT_EQ(generator.stats().peak_used_pages == pages, pool == pages) << "page " << page << " gen " << gen;
      }
    }
  }
}

// The bench holds decode until the batch is prefilled: the same tokens come out, prompt chunks fill whole steps
// (no decode token takes their budget), and the gen - 1 decode steps each carry the whole batch.
TEST(BenchSweep, DecodeAfterPrefillKeepsThePhasesApartAndTheTokens) {
  const LlamaConfig c = testing::tiny_config();
  const LlamaWeights w = testing::random_weights(c, 3);
  std::mt19937 ids(9);
  std::vector<GenerationRequest> requests;
  for (int32_t n : {5, 7, 9}) requests.push_back({testing::random_ids(ids, n, c.vocab), 4});
  auto run = [&](bool decode_after_prefill) {
    CpuBackend backend(c, w, 16, 4);
    PageTables tables(16, 4);
    GeneratorOptions options{4, {}};
    options.decode_after_prefill = decode_after_prefill;
    Generator generator(c, backend, tables, options, [](int32_t) { return false; });
    std::vector<std::vector<int32_t>> tokens;
    for (const GenerationResult& r : generator.generate(requests)) tokens.push_back(r.tokens);
    return std::pair(tokens, generator.stats().steps);
  };
  const auto [riding, riding_steps] = run(false);
  const auto [held, held_steps] = run(true);
  EXPECT_EQ(held, riding);
  EXPECT_EQ(held_steps, (5 + 7 + 9 + 3) / 4 + 3);  // 21 prompt tokens in steps of 4, then 3 decode steps
  EXPECT_GT(riding_steps, held_steps);  // riding decode tokens take prompt budget
}

// A fake runner: batches up to `capacity` fit; it records what was asked.
struct FakeRunner {
  int32_t capacity;
  std::vector<int32_t> asked;
  bool operator()(int32_t batch) {
    asked.push_back(batch);
    return batch <= capacity;
  }
};

CapacityResult search(FakeRunner& runner, int32_t hint, int32_t limit) {
  return find_max_batch([&](int32_t b) { return runner(b); }, hint, limit);
}

TEST(BenchCapacity, ExactHintCostsTwoRunsAndShowsTheNextBatchFails) {
  FakeRunner runner{13, {}};
  const CapacityResult r = search(runner, 13, 1000);
  EXPECT_EQ(r.max_batch, 13);
  EXPECT_EQ(runner.asked, (std::vector<int32_t>{13, 14}));
  ASSERT_EQ(r.probes.size(), 2u);
  EXPECT_TRUE(r.probes[0].fits);
  EXPECT_EQ(r.probes[1].batch, 14);
  EXPECT_FALSE(r.probes[1].fits);
}

TEST(BenchCapacity, FindsTheLargestBatchFromAnyHint) {
  for (int32_t capacity : {0, 1, 2, 7, 64, 999, 1000}) {
    for (int32_t hint : {-5, 1, 3, 50, 5000}) {
      FakeRunner runner{capacity, {}};
      const CapacityResult r = search(runner, hint, 1000);
      EXPECT_EQ(r.max_batch, std::min(capacity, 1000)) << "capacity " << capacity << " hint " << hint;
      std::set<int32_t> unique(runner.asked.begin(), runner.asked.end());
      EXPECT_EQ(unique.size(), runner.asked.size()) << "a batch was run twice";
      EXPECT_LE(runner.asked.size(), 24u);  // logarithmic, not a scan
      for (int32_t b : runner.asked) EXPECT_TRUE(b >= 1 && b <= 1000);
      if (capacity < 1000) {  // the batch after the maximum was run and did not fit
        EXPECT_NE(std::find(runner.asked.begin(), runner.asked.end(), capacity + 1), runner.asked.end());
      }
    }
  }
}

TEST(BenchCapacity, NothingToSearchBelowOne) {
  FakeRunner runner{5, {}};
  EXPECT_EQ(search(runner, 3, 0).max_batch, 0);
  EXPECT_TRUE(runner.asked.empty());
}

// A clock that advances `step` seconds per run and a counter that gains `watts * step` joules.
struct FakeDevice {
  double seconds = 100;
  uint64_t millijoules = 5'000'000;
  double step;
  double watts;
  void run() {
    seconds += step;
    millijoules += static_cast<uint64_t>(watts * step * 1000);
  }
};

TEST(BenchEnergy, WindowRepeatsUntilItLastsTheMinimum) {
  FakeDevice device{.step = 0.3, .watts = 400};
  const EnergyWindow w = measure_energy_window(
      [&] { device.run(); }, [&]() -> std::optional<uint64_t> { return device.millijoules; },
      [&] { return device.seconds; }, 5.0, 3, 1000);
  EXPECT_EQ(w.repetitions, 17);  // 17 x 0.3 s = 5.1 s: the first count reaching 5 s
  EXPECT_NEAR(w.seconds, 5.1, 1e-9);
  ASSERT_TRUE(w.joules.has_value());
  EXPECT_NEAR(*w.joules, 400 * 5.1, 1e-6);
}

TEST(BenchEnergy, LongRunsStillMakeTheMinimumRepetitionsAndTheBoundHolds) {
  FakeDevice slow{.step = 9.0, .watts = 100};
  auto read_slow = [&]() -> std::optional<uint64_t> { return slow.millijoules; };
  EnergyWindow w = measure_energy_window([&] { slow.run(); }, read_slow, [&] { return slow.seconds; }, 5.0, 3, 1000);
  EXPECT_EQ(w.repetitions, 3);
  FakeDevice fast{.step = 1e-6, .watts = 100};
  auto read_fast = [&]() -> std::optional<uint64_t> { return fast.millijoules; };
  w = measure_energy_window([&] { fast.run(); }, read_fast, [&] { return fast.seconds; }, 5.0, 1, 50);
  EXPECT_EQ(w.repetitions, 50);
}

TEST(BenchEnergy, WithoutACounterOnlyTheRepetitionsRun) {
  FakeDevice device{.step = 0.01, .watts = 100};
  const EnergyWindow w = measure_energy_window([&] { device.run(); }, [] { return std::optional<uint64_t>(); },
                                               [&] { return device.seconds; }, 5.0, 4, 1000);
  EXPECT_EQ(w.repetitions, 4);
  EXPECT_FALSE(w.joules.has_value());
}

TEST(BenchEnergy, CounterThatFailsMidWindowGivesNoJoules) {
  FakeDevice device{.step = 1, .watts = 100};
  int reads = 0;
  const EnergyWindow w = measure_energy_window(
      [&] { device.run(); },
      [&]() -> std::optional<uint64_t> {
        if (reads++ == 0) return device.millijoules;
        return std::nullopt;
      },
      [&] { return device.seconds; }, 2.0, 1, 1000);
  EXPECT_FALSE(w.joules.has_value());
}

TEST(BenchStatus, AllocationFailuresAreOomOtherErrorsKeepTheirText) {
  EXPECT_EQ(failure_status(std::bad_alloc()), "oom");
  EXPECT_EQ(failure_status(Error("CUDA error on device 0: out of memory (cudaErrorMemoryAllocation) in cudaMalloc")),
            "oom");
  EXPECT_EQ(failure_status(Error("cuBLAS error 3 on device 0 in cublasGemmEx")), "oom");
  EXPECT_EQ(failure_status(Error("cuBLAS error 13 on device 0 in cublasGemmEx")),
            "cuBLAS error 13 on device 0 in cublasGemmEx");
  EXPECT_EQ(failure_status(Error("--kv nuq3 on --device cuda: no")), "--kv nuq3 on --device cuda: no");
}

TEST(BenchEnergy, CarbonAndCostPerMillionTokens) {
  const PerMillionTokens p = per_million_tokens(0.36, {.grid_gco2_per_kwh = 500, .usd_per_kwh = 0.2, .pue = 1.5});
  EXPECT_NEAR(p.kwh, 0.36 * 1e6 * 1.5 / 3.6e6, 1e-12);  // 0.15 kWh
  EXPECT_NEAR(p.gco2, 75, 1e-9);
  EXPECT_NEAR(p.usd, 0.03, 1e-12);
}

TEST(NvmlEnergy, MissingLibraryIsUnsupportedWithAReasonAndNeverThrows) {
  NvmlEnergyMeter meter("", "libkvq-no-such-nvml.so.1");
  EXPECT_FALSE(meter.supported());
  EXPECT_TRUE(meter.status().starts_with("unsupported: cannot load libkvq-no-such-nvml.so.1")) << meter.status();
  EXPECT_FALSE(meter.total_energy_mj().has_value());
}

TEST(NvmlEnergy, LibraryWithoutNvmlFunctionsIsUnsupported) {
  NvmlEnergyMeter meter("", "libm.so.6");  // loads, but is not NVML
  EXPECT_FALSE(meter.supported());
  EXPECT_NE(meter.status().find("lacks the NVML functions"), std::string::npos) << meter.status();
}

// kvq bench writes its report after every point: each write replaces the file with the whole object so far,
// and leaves nothing beside it.
TEST(RunReportFile, EachWriteReplacesTheFileWithEveryResultSoFar) {
  const std::filesystem::path dir = std::filesystem::path(::testing::TempDir()) / "kvq_run_report";
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "bench.json").string();
  char name[] = "kvq";
  char* argv[] = {name};
  RunReport report("bench", 1, argv);
  auto read = [&] { return nlohmann::json::parse(std::ifstream(path)); };
  report.add_result({{"batch", 1}});
  report.write(path);
  EXPECT_EQ(read()["results"].size(), 1u);
  report.add_result({{"batch", 2}});
  report.write(path);
  const nlohmann::json written = read();
  ASSERT_EQ(written["results"].size(), 2u);
  EXPECT_EQ(written["results"][1]["batch"], 2);
  EXPECT_FALSE(std::filesystem::exists(path + ".partial"));
  EXPECT_THROW(report.write((dir / "no-such-dir" / "bench.json").string()), Error);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace kvq
