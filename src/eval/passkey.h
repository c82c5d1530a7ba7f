// Passkey retrieval in the Landmark-attention format: an instruction line, the
// filler repeated, the needle "The pass key is K. Remember it. K is the pass
// key." at a depth, the rest of the filler and the question; K is drawn in
// 1..50000. Scored by score_passkey (the first integer of up to 10 tokens).
#pragma once

#include "eval/tasks.h"

namespace kvq {

constexpr int32_t kPasskeyNewTokens = 10;

// Sample i puts its needle at depth (i mod depths) / (depths - 1) of the
// filler (0: right after the instruction, 1: right before the question);
// haystack units are filler repetitions.
TaskGenerator passkey_generator(int32_t depths, int32_t length);

}  // namespace kvq
