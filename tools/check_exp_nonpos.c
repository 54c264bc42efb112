/* Check that fa_expf_nonpos / fa_exp_nonpos (the softmax loops' exp, fa_exp.h) give bitwise
 * the results of fa_expf / fa_exp on their domain: every non-positive float (and every
 * NaN payload), 3e8 non-positive doubles and the edge cases. About 20 s; exit status 1 on
 * any difference. Run after changing either function:
 *   gcc -O3 -fno-trapping-math -mavx2 -mfma -Isrc/fastattn tools/check_exp_nonpos.c \
 *       -o /tmp/check_exp && /tmp/check_exp
 */
#include <stdio.h>
#include <stdlib.h>
#include "fa_exp.h"
int main(void){
  long nd=0;
  for (uint64_t b=0x80000000u; b<=0xFFFFFFFFu; b++) { uint32_t bb=(uint32_t)b; float v; memcpy(&v,&bb,4); float a=fa_expf(v), c=fa_expf_nonpos(v); if (memcmp(&a,&c,4) && !(a!=a && c!=c)) {nd++; if(nd<4) printf("x=%a old=%a new=%a\n",v,a,c);} }
  printf("float: every non-positive float and NaN payload: %ld differences\n", nd);
  nd=0; uint64_t s=88172645463325252ULL;
  for (long i=0;i<300000000;i++){ s^=s<<13; s^=s>>7; s^=s<<17; uint64_t b = s | 0x8000000000000000ULL; double v; memcpy(&v,&b,8);
    if (i%3==0) v = -(double)(s>>11)*0x1p-53*760.0;  /* dense in [-760, 0] */
    double a=fa_exp(v), c=fa_exp_nonpos(v); if (memcmp(&a,&c,8) && !(a!=a && c!=c)) {nd++; if(nd<4) printf("x=%a old=%a new=%a\n",v,a,c);} }
  double edge[]={-INFINITY,-0.0,0.0,-745.1332191019411,-745.1332191019412,-708.3964185322641,-709.0,-746.0,-1e-300,-4.9e-324};
  for (int i=0;i<10;i++){double a=fa_exp(edge[i]),c=fa_exp_nonpos(edge[i]); if(memcmp(&a,&c,8)) {nd++; printf("edge %a: %a %a\n",edge[i],a,c);}}
  printf("double: 3e8 random non-positive doubles + edges: %ld differences\n", nd);
  return nd!=0;
}
