// The --dummy presets: LlamaConfig of realistic shapes for speed and memory
// runs with random weights (DESIGN.md, "Command line").
#pragma once

#include <string>
#include <vector>

#include "model/llama.h"

namespace kvq {

// Names accepted by dummy_preset(), in the order DESIGN.md lists them.
std::vector<std::string> dummy_preset_names();

// The preset's configuration; throws kvq::UsageError naming the valid presets.
LlamaConfig dummy_preset(const std::string& name);

}  // namespace kvq
