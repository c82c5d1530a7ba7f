// kvq-testtool: exposes engine internals to the Python reference tests.
//   logits  -m MODEL --tokens-json F --out F.npy   one ragged batch, every row's logits
//   dequant -m MODEL --tensor NAME --out F.npy     one tensor dequantized to fp32
// .npy output is float32, C order.
#include <fstream>
#include <iostream>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "cpu/cpu_backend.h"
#include "engine/loaded_model.h"
#include "kv/page_tables.h"
#include "model/dequant.h"

namespace {

void write_npy(const std::string& path, const std::vector<int64_t>& shape, const std::vector<float>& data) {
  std::string dims;
  for (int64_t d : shape) dims += fmt::format("{}, ", d);
  if (shape.size() > 1) dims.erase(dims.size() - 2);
  std::string header = fmt::format("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}), }}", dims);
  // Magic (6) + version (2) + length (2) + header + padding + '\n' is a multiple of 64.
  header.append(63 - (10 + header.size()) % 64, ' ');
  header.push_back('\n');
  std::ofstream out(path, std::ios::binary);
  if (!out) kvq::fail("cannot write '{}'", path);
  out.write("\x93NUMPY\x01\x00", 8);
  const uint16_t length = static_cast<uint16_t>(header.size());
  out.write(reinterpret_cast<const char*>(&length), 2);
  out << header;
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size() * sizeof(float)));
}

int logits(const std::string& model_path, const std::string& tokens_path, const std::string& out_path, int page) {
  kvq::LoadedModel model(model_path, true);
  std::ifstream in(tokens_path);
  if (!in) kvq::fail("cannot read '{}'", tokens_path);
  const auto batches = nlohmann::json::parse(in).get<std::vector<std::vector<int32_t>>>();
  int64_t total = 0;
  for (const auto& seq : batches) total += static_cast<int64_t>(seq.size());
  // Pages scattered: a dummy sequence takes every other page first.
  const int32_t n_pages = 2 * static_cast<int32_t>((total + page - 1) / page + batches.size()) + 2;
  kvq::PageTables tables(n_pages, page);
  kvq::CpuBackend backend(model.config, model.weights, n_pages, page);
  kvq::StepBatch batch;
  for (size_t s = 0; s < batches.size(); ++s) {
    const int32_t seq = static_cast<int32_t>(s);
    const int32_t spacer = static_cast<int32_t>(batches.size() + s);
    tables.add_sequence(seq);
    tables.add_sequence(spacer);
    for (int64_t need = 0; need < static_cast<int64_t>(batches[s].size()); need += page) {
      tables.reserve(seq, need + 1);
      tables.reserve(spacer, tables.capacity(spacer) + 1);
    }
    batch.add_chunk(seq, 0, batches[s].data(), static_cast<int32_t>(batches[s].size()), true);
  }
  std::vector<float> out;
  backend.forward(batch, tables, out);
  write_npy(out_path, {total, model.config.vocab}, out);
  return 0;
}

int dequant(const std::string& model_path, const std::string& name, const std::string& out_path) {
  kvq::GgufFile file = kvq::GgufFile::open(model_path);
  const kvq::GgufTensorInfo& info = file.tensor(name);
  std::vector<float> out(info.n_elements);
  kvq::dequantize(info.type, file.tensor_bytes(info), out);
  write_npy(out_path, std::vector<int64_t>(info.dims.rbegin(), info.dims.rend()), out);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kvq-testtool"};
  app.require_subcommand(1);
  std::string model, tokens, out, tensor;
  int page = 16;
  CLI::App* logits_cmd = app.add_subcommand("logits");
  logits_cmd->add_option("-m,--model", model)->required();
  logits_cmd->add_option("--tokens-json", tokens)->required();
  logits_cmd->add_option("--out", out)->required();
  logits_cmd->add_option("--page", page);
  CLI::App* dequant_cmd = app.add_subcommand("dequant");
  dequant_cmd->add_option("-m,--model", model)->required();
  dequant_cmd->add_option("--tensor", tensor)->required();
  dequant_cmd->add_option("--out", out)->required();
  CLI11_PARSE(app, argc, argv);
  try {
    return logits_cmd->parsed() ? logits(model, tokens, out, page) : dequant(model, tensor, out);
  } catch (const std::exception& e) {
    fmt::print(stderr, "kvq-testtool: error: {}\n", e.what());
    return 1;
  }
}
